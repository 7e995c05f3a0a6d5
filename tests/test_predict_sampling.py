"""Sampled answers depend on (--seed, the question's place in the file, which sample of best-of-N) alone: not on
--batch_size, --num_chunks or where a run was interrupted."""
import json
from pathlib import Path

import torch

from training.predict.main import parse, predict


def _questions(world, out: Path, n: int) -> Path:
    """n questions of different lengths: a batch of them is left-padded."""
    rows = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:n]]
    for i, r in enumerate(rows):
        r["text"] += " Answer in one word, please." * (i % 3)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _argv(world, tiny, qfile, afile, *extra):
    return ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(afile), "--max_new_tokens", "8", "--do_sample", "--temperature", "1.5",
            "--no-progress", "--precision", "fp32", "--device", "cpu", *extra]


def _texts(afile: Path) -> dict:
    return {r["question_id"]: r["text"] for r in map(json.loads, afile.read_text().splitlines())}


def test_sampled_answers_do_not_depend_on_batch_size_or_chunks(world, tiny, tmp_path):
    qfile = _questions(world, tmp_path / "q.jsonl", 7)
    predict(parse(_argv(world, tiny, qfile, tmp_path / "b1.jsonl", "--batch_size", "1")))
    predict(parse(_argv(world, tiny, qfile, tmp_path / "b3.jsonl", "--batch_size", "3")))
    for i in range(2):
        predict(parse(_argv(world, tiny, qfile, tmp_path / "c2.jsonl", "--batch_size", "3", "--num_chunks", "2",
                            "--chunk_idx", str(i))))
    one = _texts(tmp_path / "b1.jsonl")
    assert len(one) == 7 and len(set(one.values())) > 1
    assert _texts(tmp_path / "b3.jsonl") == one
    assert _texts(tmp_path / "c2.jsonl") == one
    predict(parse(_argv(world, tiny, qfile, tmp_path / "s1.jsonl", "--batch_size", "3", "--seed", "1")))
    assert _texts(tmp_path / "s1.jsonl") != one  # the seed still matters


def test_a_resumed_sampling_run_equals_an_uninterrupted_one(world, tiny, tmp_path):
    qfile = _questions(world, tmp_path / "q.jsonl", 5)
    predict(parse(_argv(world, tiny, qfile, tmp_path / "whole.jsonl", "--batch_size", "2")))
    afile = tmp_path / "resumed.jsonl"
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    afile.write_text(lines[0] + "\n" + lines[3] + "\n" + lines[4][:10])  # two answered, one cut short
    (tmp_path / "resumed.predict.json").write_text((tmp_path / "whole.predict.json").read_text())
    predict(parse(_argv(world, tiny, qfile, afile, "--batch_size", "2")))
    assert _texts(afile) == _texts(tmp_path / "whole.jsonl")


def test_row_sampler_draws_from_softmax_of_logits_over_temperature_cut_by_top_p():
    from training.predict.generate import RowSampler
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, top_p, n = 0.7, 0.9, 20_000
    p = (logits / temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)  # the likeliest tokens whose mass reaches top_p
    keep[order[:int((p[order].cumsum(-1) < top_p).sum()) + 1]] = True
    expected = torch.where(keep, p, 0.0) / p[keep].sum()
    assert 0 < int((~keep).sum()) < len(p) - 1  # the cut removes some tokens, not all but one
    sampler = RowSampler(list(range(n)), temperature, top_p)
    out = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone())
    assert bool((out.isfinite().sum(-1) == 1).all())  # one token left possible in each row
    drawn = out.isfinite().float().mean(0)
    assert float((drawn - expected).abs().max()) < 0.01
    assert float(drawn[~keep].sum()) == 0.0
    again = RowSampler([3, 5], temperature, top_p)(torch.zeros(2, 1, dtype=torch.long), logits.expand(2, -1).clone())
    assert torch.equal(again, out[[3, 5]])  # a row's draw is its seed's, whatever rows share its batch


def test_each_of_a_prompts_best_of_n_samples_is_its_seeds_own(world, tiny):
    """generate's rows are each prompt's n samples in turn: the k-th sample of a prompt is the same batched with
    another prompt or alone."""
    from test_generate import _setup
    from training.predict.generate import DecodeArgs, generate_batch
    from training.templates.chat import ChatEncoder
    model, processor, arch, prompts, images = _setup(world, tiny)
    encoder = ChatEncoder(processor, arch, 512)
    decode = DecodeArgs(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.95, num_return_sequences=3)
    both = generate_batch(model, processor, encoder, arch.name, prompts[:2], images[:2], decode, seeds=[7, 8])
    alone = generate_batch(model, processor, encoder, arch.name, prompts[1:2], images[1:2], decode, seeds=[8])
    assert both[1] == alone[0] and len(set(both[1])) > 1
