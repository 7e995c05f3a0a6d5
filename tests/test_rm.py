"""Reward-model stage end to end on the tiny VLM: train, save, reload, score; bad input; best-of-n."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sft_helpers import split_rows

from training.config import LoraArgs, ModelArgs
from training.data.bad_rows import BadRowError
from training.data.formats import read_preferences, read_prompts
from training.data.images import load_image
from training.rm.data import RewardScorer, encode_for_rm
from training.rm.main import main
from training.rm.model import RewardModel, load_reward_model
from training.templates.chat import ChatEncoder


def rm_args(world: Path, tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"),
            "--eval_data_path", str(world / "preference_heldout.json"), "--image_folder", str(world / "images"),
            "--output_dir", str(out), "--figure_dir", str(out.parent / "figure"), "--no-progress",
            "--logging_steps", "1", "--num_warmup_steps", "0", "--lr_scheduler_type", "constant", *extra]


# SGD: the update is the gradient, so rank-split and batch-split runs must agree; no centering
# (a per-micro-batch term)
DIST_ARGS = ("--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.5", "--center_coef", "0")


def mixed_lists(world: Path, path: Path) -> tuple[str, ...]:
    """Writes the world's first 8 training rows to `path`, every third one its scene's ranked list of 3 (3 pairs)
    instead of its pair; -> the arguments that train on them with Bradley-Terry over every pair. Micro-batches and
    ranks then hold unequal numbers of pairs: a mean of their means is not the step's mean over its pairs (with
    pairs only, both are equal, and no test could tell them)."""
    pairs = json.loads((world / "preference_train.json").read_text())
    ranked = json.loads((world / "ranked_train.json").read_text())
    path.write_text(json.dumps([ranked[i] if i % 3 == 0 else pairs[i] for i in range(8)]))
    return mixed_args(path)


def mixed_args(path: Path) -> tuple[str, ...]:
    """The arguments that train on mixed_lists' file `path` (written already), Bradley-Terry over every pair."""
    return "--data_path", str(path), "--rank_loss", "bradley_terry"


def _scores(rm, processor, arch, world, factual=True, batch_size=16):
    recs = read_preferences([str(world / "preference_heldout.json")], str(world / "images"))
    scorer = RewardScorer(rm, processor, arch, 256, batch_size, factual=factual)
    flat = [(r, resp) for r in recs for resp in r.responses]
    return scorer.score_records([r for r, _ in flat], str(world / "images"), [x for _, x in flat])


@pytest.fixture(scope="module")
def trained(world, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    result = main(rm_args(world, tiny, out, "--max_steps", "6", "--per_device_train_batch_size", "4",
                          "--learning_rate", "3e-3", "--eval_steps", "3"))
    return out, result


def test_rm_trains_saves_reloads_with_identical_scores(trained, world):
    out, result = trained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "value_head.safetensors", "reward_model.json",
                 "run_config.json", "metrics.jsonl", "bad_rows.json", "eval_metrics.json", "eval_rewards.json"):
        assert (out / name).exists(), name
    assert (out.parent / "figure" / "rm_rewards.png").stat().st_size > 0
    assert (out.parent / "figure" / "rm_metrics.png").stat().st_size > 1000  # training curves
    assert list((out / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert {"accuracy", "reward_chosen", "reward_rejected", "tokens_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]  # during training, and after saving
    assert rows[-1]["eval/n"] == 8 and 0 <= rows[-1]["eval/accuracy"] <= 1
    assert result["loss"] == "bradley_terry" and json.loads((out / "reward_model.json").read_text())["factual"]

    rm, processor, arch = load_reward_model(out)
    assert rm.factual and not any(p.requires_grad for p in rm.parameters())
    first = _scores(rm, processor, arch, world)
    again = _scores(*load_reward_model(out), world)
    assert torch.equal(first, again)  # reload is deterministic
    saved = torch.tensor(json.loads((out / "eval_rewards.json").read_text())["ranked_rewards"], dtype=torch.float64)
    # the scores the trained in-memory model gave at its final evaluation (other batch shapes)
    torch.testing.assert_close(first.double(), saved.flatten(), rtol=0, atol=1e-5)


def test_reward_read_at_last_token_batch_invariant_and_values_ignore_factual_suffix(tiny, world):
    from training.model.builder import load_model_and_processor
    torch.manual_seed(0)
    backbone, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                         for_training=False)
    rm = RewardModel(backbone, factual=True).eval()
    scores = _scores(rm, processor, arch, world, batch_size=16)
    alone = _scores(rm, processor, arch, world, batch_size=1)
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-5)  # padding never changes a reward

    rec = read_preferences([str(world / "preference_train.json")], str(world / "images"))[0]
    enc = ChatEncoder(processor, arch, 256)
    images = [load_image(s, str(world / "images")) for s in rec.images]
    plain = encode_for_rm(enc, rec.prompt, rec.responses[0], images)
    fact = encode_for_rm(enc, rec.prompt, rec.responses[0], images, rec.facts, factual=True)
    n = len(plain.input_ids)
    assert torch.equal(fact.input_ids[:n], plain.input_ids) and len(fact.input_ids) > n
    with torch.no_grad():
        v_plain = rm.values(plain.input_ids[None], torch.ones(1, n, dtype=torch.long), **plain.vision)
        v_fact = rm.values(fact.input_ids[None], torch.ones_like(fact.input_ids)[None], **fact.vision)
        r_fact = rm(fact.input_ids[None], torch.ones_like(fact.input_ids)[None], **fact.vision)
    # causal: a critic from a factual RM reads the policy's own sequence (module doc of rm/factual.py)
    torch.testing.assert_close(v_fact[:, :n], v_plain, rtol=0, atol=1e-5)
    assert r_fact.item() == pytest.approx(v_fact[0, -1].item(), abs=1e-6)


def test_lora_reward_model_saves_adapters_and_reloads(world, tiny, tmp_path):
    out = tmp_path / "rm_lora"
    main(rm_args(world, tiny, out, "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4",
                 "--learning_rate", "1e-2", "--no-factual", "--eval_data_path", ""))
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "value_head.safetensors").exists()
    rm, processor, arch = load_reward_model(out)
    assert not rm.factual
    a = _scores(rm, processor, arch, world, factual=False)
    b = _scores(*load_reward_model(out), world, factual=False)
    assert torch.equal(a, b)
    critic, _, _ = load_reward_model(out, lora_args=LoraArgs(lora_r=4), for_training=True)  # PPO critic init
    assert critic.value_head.weight.requires_grad
    torch.testing.assert_close(critic.value_head.weight, rm.value_head.weight)
    # merged (python -m training.model.merge_lora), it is still this reward model: the head was left behind
    from training.model.merge_lora import merge_lora
    merge_lora(out, tmp_path / "merged")
    torch.testing.assert_close(_scores(*load_reward_model(tmp_path / "merged"), world, factual=False), a,
                               rtol=0, atol=1e-5)


def test_qlora_reward_model_trains_and_evaluates(world, tiny, tmp_path):
    """QLoRA through the loop's held-out evaluation (eval mode) and on into more training steps."""
    out = tmp_path / "rm_qlora"
    r = main(rm_args(world, tiny, out, "--max_steps", "4", "--eval_steps", "2", "--per_device_train_batch_size", "4",
                     "--per_device_eval_batch_size", "16", "--qlora", "--lora_r", "4", "--lora_dropout", "0",
                     "--freeze_vision_tower", "--learning_rate", "1e-2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "eval/accuracy" in x] == [2, 4]  # mid-run and final evaluation
    assert 0.0 <= r["eval"]["eval/accuracy"] <= 1.0 and (out / "adapter" / "adapter_config.json").exists()


def test_ranked_lists_train_with_plackett_luce(world, tiny, tmp_path):
    r = main(rm_args(world, tiny, tmp_path / "pl", "--data_path", str(world / "ranked_train.json"),
                     "--max_steps", "2", "--per_device_train_batch_size", "4"))
    assert r["loss"] == "plackett_luce" and r["eval"]["eval/n"] == 8
    with pytest.raises(SystemExit, match="--margin 1.0 is a Bradley-Terry margin; the Plackett-Luce loss"):
        main(rm_args(world, tiny, tmp_path / "m", "--data_path", str(world / "ranked_train.json"), "--margin", "1"))


def test_held_out_data_that_is_training_data_is_refused(world, tiny, tmp_path):
    """--eval_data_path naming the training file reported training accuracy as held-out."""
    train = str(world / "preference_train.json")
    with pytest.raises(SystemExit, match="--eval_data_path .*preference_train.json is training data too"):
        main(rm_args(world, tiny, tmp_path / "x", "--data_path", train, "--eval_data_path", train))
    held = str(world / "preference_heldout.json")  # in a list with spaces, or in a folder given as the data
    with pytest.raises(SystemExit, match="is training data too"):
        main(rm_args(world, tiny, tmp_path / "x", "--data_path", f"{held}, {train}", "--eval_data_path", train))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pairs.json").write_text((world / "preference_train.json").read_text())
    with pytest.raises(SystemExit, match="is training data too"):
        main(rm_args(world, tiny, tmp_path / "x", "--data_path", str(folder), "--eval_data_path",
                     str(folder / "pairs.json")))


def test_a_data_path_list_with_spaces_reads_every_file(world, tiny, tmp_path):
    """--data_path "a.json, b.json" (the list require_held_out and the readers take) stopped with "no such file":
    the stage split it itself and kept the space in front of the second path."""
    rows = json.loads((world / "preference_train.json").read_text())
    a, b = split_rows(world / "preference_train.json", tmp_path, (0, 8), (8, len(rows)))
    r = main(rm_args(world, tiny, tmp_path / "o", "--data_path", f"{a}, {b}", "--eval_data_path", "",
                     "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--no-factual"))
    assert len([h for h in r["history"] if "loss" in h]) == len(rows) // 4  # one epoch over both files


def _bad_copy(world, tmp_path):
    rows = json.loads((world / "preference_train.json").read_text())
    rows[2]["conversations"][-1]["value"] = [rows[2]["conversations"][-1]["value"][0]] * 2  # identical
    rows[4]["conversations"][-1]["value"] = rows[4]["conversations"][-1]["value"][:1]  # ranked list of 1
    del rows[6]["facts"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("row,field", [(2, "identical"), (4, "at least 2"), (6, "facts")])
def test_bad_rows_stop_with_file_row_field(world, tiny, tmp_path, row, field):
    rows = json.loads(_bad_copy(world, tmp_path).read_text())
    good = json.loads((world / "preference_train.json").read_text())
    only = [rows[i] if i == row else good[i] for i in range(len(good))]  # one bad row at a time
    path = tmp_path / "one_bad.json"
    path.write_text(json.dumps(only))
    with pytest.raises(BadRowError) as e:
        main(rm_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--data_path", str(path)))
    assert str(path) in str(e.value) and f"row {row}" in str(e.value) and field in str(e.value)


def test_bad_rows_skipped_and_counted(world, tiny, tmp_path):
    path = _bad_copy(world, tmp_path)
    out = tmp_path / "o"
    main(rm_args(world, tiny, out, "--max_steps", "1", "--data_path", str(path), "--skip_bad_rows",
                 "--per_device_train_batch_size", "4", "--eval_data_path", ""))
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["n_skipped"] == 3 and sorted(r["row"] for r in report["rows"]) == [2, 4, 6]
    # without factual mode the row lacking facts is fine
    main(rm_args(world, tiny, tmp_path / "nf", "--max_steps", "1", "--data_path", str(path), "--skip_bad_rows",
                 "--per_device_train_batch_size", "4", "--eval_data_path", "", "--no-factual"))
    assert json.loads((tmp_path / "nf" / "bad_rows.json").read_text())["n_skipped"] == 2


def test_held_out_rewards_name_their_rows(world, tiny, tmp_path):
    """eval_rewards.json left skipped held-out rows out, so its k-th list was no longer the file's k-th row."""
    rows = json.loads((world / "preference_heldout.json").read_text())[:6]
    rows[1]["conversations"][-1]["value"] = rows[1]["conversations"][-1]["value"][:1]  # refused as it is read
    rows[3]["conversations"][0]["value"] += " Describe every shape." * 60  # refused as it is encoded
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "o"
    main(rm_args(world, tiny, out, "--max_steps", "1", "--eval_data_path", str(path), "--skip_bad_rows"))
    saved = json.loads((out / "eval_rewards.json").read_text())
    assert saved["rows"] == [{"file": str(path), "row": i} for i in (0, 2, 3, 4, 5)]
    assert [None in x for x in saved["ranked_rewards"]] == [False, False, True, False, False]


def test_default_run_needs_the_sft_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run_sft.sh"):
        main([])


def test_best_of_n_keeps_the_highest_reward(trained, world, tiny, tmp_path):
    from training.predict.main import main as predict
    out_rm, _ = trained
    out = predict(["--model_path", str(tiny), "--data_path", str(world / "ppo_prompts.json"), "--image_folder",
                   str(world / "images"), "--output_file", str(tmp_path / "bon.jsonl"), "--best_of_n", "4",
                   "--reward_model", str(out_rm), "--max_new_tokens", "8", "--no-progress"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and all(r["best_of_n"] == 4 for r in rows)

    # the kept answer is the argmax of the scorer's rewards (the factual block used: prompts carry facts)
    from training.model.builder import load_model_and_processor
    from training.predict.generate import DecodeArgs, best_of_n
    model, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                      for_training=False)
    recs = read_prompts([str(world / "ppo_prompts.json")], str(world / "images"))[:3]
    images = [[load_image(s, str(world / "images")) for s in r.images] for r in recs]

    class LengthScorer:  # reward = answer length: best-of-n must return the longest candidate
        def score(self, prompts, imgs, responses, facts=None):
            assert facts is not None and len(responses) == 3 * 5
            return torch.tensor([float(len(t)) for t in responses])

    torch.manual_seed(0)
    best, r_best, r_all = best_of_n(model, processor, ChatEncoder(processor, arch, 512), arch.name,
                                    [r.prompt for r in recs], images, DecodeArgs(max_new_tokens=6), 5,
                                    LengthScorer(), [r.facts for r in recs])
    assert r_all.shape == (3, 5) and torch.equal(r_best, r_all.max(-1).values)
    assert [float(len(t)) for t in best] == r_best.tolist()


def test_llava_rlhf_rows_with_caption_file_feed_the_factual_block(world, tiny, tmp_path):
    """LLaVA-RLHF's format (output_1/output_2/preference) + image_to_caption.json -> facts."""
    rows, captions = [], {}
    for k, r in enumerate(json.loads((world / "preference_train.json").read_text())):
        good, bad = r["conversations"][-1]["value"]
        flip = k % 2 == 1
        rows.append({"id": r["id"], "image": r["image"], "preference": 2 if flip else 1,
                     "conversations": [r["conversations"][0], {"from": "gpt", "value": ""}],
                     "output_1": {"value": bad if flip else good}, "output_2": {"value": good if flip else bad}})
        captions[r["image"]] = r["facts"]
    data, caps = tmp_path / "llava_rlhf.json", tmp_path / "image_to_caption.json"
    data.write_text(json.dumps(rows))
    caps.write_text(json.dumps(captions))
    recs = read_preferences([str(data)], str(world / "images"), captions_file=str(caps))
    original = json.loads((world / "preference_train.json").read_text())
    assert recs[1].responses == original[1]["conversations"][-1]["value"] and recs[1].facts == original[1]["facts"]
    args = ["--max_steps", "1", "--data_path", str(data), "--eval_data_path", "", "--per_device_train_batch_size", "4"]
    with pytest.raises(BadRowError, match="facts"):  # factual mode without captions: no facts
        main(rm_args(world, tiny, tmp_path / "a", *args))
    main(rm_args(world, tiny, tmp_path / "b", *args, "--captions_file", str(caps)))
    assert json.loads((tmp_path / "b" / "bad_rows.json").read_text())["n_skipped"] == 0


def test_resumed_run_equals_uninterrupted(world, tiny, tmp_path):
    """Cut in the second epoch (4 steps per epoch): the facts' shuffle follows the epoch on resume."""
    from safetensors.torch import load_file
    common = ["--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--eval_data_path",
              "", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1"]
    main(rm_args(world, tiny, tmp_path / "full", *common))
    r = main(rm_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "5", "--stop_after_steps", "5"))
    assert r["interrupted"] and not (tmp_path / "cut" / "value_head.safetensors").exists()
    main(rm_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_qlora_reward_model_at_zero3_resumes_exactly_and_saves_its_adapters(world, tiny, tmp_path):
    """The reward model holds its peft backbone inside: its QLoRA checkpoints failed to load back (the 4-bit
    quantisation state), and a ZeRO-3 save must gather the adapters before peft writes them."""
    from safetensors.torch import load_file
    common = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--eval_data_path",
              "", "--qlora", "--lora_r", "4", "--lora_dropout", "0", "--freeze_vision_tower", "--zero_stage", "3"]
    main(rm_args(world, tiny, tmp_path / "full", *common))
    assert main(rm_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "2")
                )["interrupted"]
    main(rm_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    for name in ("adapter/adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(v.numel() for v in a.values())  # gathered, not ZeRO-3 placeholders
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_factual_block_cut_by_max_seq_len_is_a_bad_row_reported_once(world, tiny):
    from training.data.bad_rows import BadRowReport
    from training.model.builder import load_model_and_processor
    from training.rm.data import RMDataset
    _, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    recs = read_preferences([str(world / "preference_train.json")], str(world / "images"))[:2]
    report = BadRowReport(skip=True)
    ds = RMDataset(recs, ChatEncoder(processor, arch, 120), str(world / "images"), report, factual=True)
    assert ds[0] is None and ds[0] is None and ds[1] is None  # image + question + answer fit, the facts do not
    assert len(report.skipped) == 2 and "max_seq_len=120" in report.skipped[0]["reason"]
    assert RMDataset(recs, ChatEncoder(processor, arch, 120), str(world / "images"), report, factual=False)[0]
    with pytest.raises(BadRowError, match="max_seq_len=120"):
        RMDataset(recs, ChatEncoder(processor, arch, 120), str(world / "images"), BadRowReport(), factual=True)[0]


def test_changed_scene_makes_exactly_one_error_of_each_type():
    import random

    from training.rm.quality import ERRORS, changed_scene
    from training.world.scenes import KINDS, Obj, Scene

    scene = Scene("s", "cyan", (Obj("circle", "blue", 7, 1, 1), Obj("cross", "red", 7, 5, 5),
                                Obj("cross", "blue", 7, 9, 9)))
    counts = lambda s: {k: s.count(k) for k in KINDS if s.count(k)}  # noqa: E731
    for seed in range(20):
        rng = random.Random(seed)
        got = {e: changed_scene(scene, e, rng) for e in ERRORS}
        add, swap, omit, cnt = (counts(got[e]) for e in ("add", "swap", "omit", "count"))
        assert len(add) == 3 and {k: add[k] for k in ("circle", "cross")} == {"circle": 1, "cross": 2}
        assert len(swap) == 2 and sorted(swap.values()) == [1, 2] and set(swap) != {"circle", "cross"}
        assert omit in ({"circle": 1}, {"cross": 2})
        assert set(cnt) <= {"circle", "cross"} and sum(abs(cnt.get(k, 0) - v) for k, v in counts(scene).items()) == 1
    assert changed_scene(Scene("t", "cyan", (Obj("circle", "blue", 7, 1, 1),)), "omit", random.Random(0)) is None


def test_held_out_lists_over_two_ranks_each_scored_once(world, tiny):
    """5 lists over 2 (stand-in) ranks, eval batch 2: rank 1 scores lists 1 and 3 and runs a discarded
    stand-in forward; the rows each rank fills add up to one rank's matrix. With list 0 a bad row, the
    stand-in comes from another list."""
    from sft_helpers import FakeRank

    from training.config import OptimArgs, RMArgs
    from training.data.bad_rows import BadRowReport
    from training.rm.data import RMDataset
    from training.rm.trainer import RMTrainer
    from training.model.builder import load_model_and_processor
    backbone, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                    for_training=False)
    rm = RewardModel(backbone, factual=True).eval()
    recs = read_preferences([str(world / "preference_heldout.json")], str(world / "images"))[:5]
    ds = RMDataset(recs, ChatEncoder(proc, arch, 512), str(world / "images"), BadRowReport(), True)
    cfg = {"optim": OptimArgs(per_device_train_batch_size=1, per_device_eval_batch_size=2), "rm": RMArgs()}
    mats = []
    for rank, n_ranks in ((0, 1), (0, 2), (1, 2)):
        t = RMTrainer(FakeRank(rank, n_ranks), rm, proc, ds, ds, cfg, arch.name)
        mats.append(t.evaluate()[1])
    one, r0, r1 = mats
    assert not r0[1::2].any() and not r1[0::2].any()  # rank 0 fills rows 0, 2, 4; rank 1 rows 1, 3
    torch.testing.assert_close(r0 + r1, one, rtol=1e-5, atol=1e-5)  # other batch mates: float32 rounding

    class FirstIsBad:
        records = ds.records

        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return None if i == 0 else ds[i]
    R = RMTrainer(FakeRank(1, 2), rm, proc, ds, FirstIsBad(), cfg, arch.name).evaluate()[1]
    torch.testing.assert_close(R[[1, 3]], one[[1, 3]], rtol=1e-5, atol=1e-5)


def test_eval_steps_default_follows_the_held_out_pairs(world, tiny, tmp_path):
    """Unset, --eval_steps is the stage's 250 with held-out pairs and 0 without (user data has none by
    default: before, 250 stood in the run's config and was silently unused); set without them, it stops."""
    from training.config import DataArgs, RunArgs
    from training.rm.main import EVAL_STEPS, resolve_eval_steps
    for eval_path, want in (("held.json", EVAL_STEPS), ("", 0)):
        run = RunArgs(eval_steps=None)
        resolve_eval_steps(DataArgs(eval_data_path=eval_path), run)
        assert run.eval_steps == want
    run = RunArgs(eval_steps=7)
    resolve_eval_steps(DataArgs(eval_data_path="held.json"), run)
    assert run.eval_steps == 7
    args = [a for a in rm_args(world, tiny, tmp_path / "rm") if a != str(world / "preference_heldout.json")]
    args.remove("--eval_data_path")
    with pytest.raises(SystemExit, match="--eval_data_path"):
        main([*args, "--eval_steps", "5"])


def _as_trl(world: Path, path: Path, margins: list | None) -> Path:
    """The world's first 8 pairs in TRL's conversational preference format, with a `margin` column if given."""
    def msg(role, text, image=False):
        return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}

    rows = []
    for i, r in enumerate(json.loads((world / "preference_train.json").read_text())[:8]):
        chosen, rejected = r["conversations"][-1]["value"][:2]
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        rows.append({"images": [r["image"]], "prompt": [msg("user", q, image=True)],
                     "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)],
                     "facts": r["facts"], **({"margin": margins[i]} if margins else {})})
    path.write_text(json.dumps(rows))
    return path


def test_trl_margin_column_is_each_rows_bradley_terry_margin(world, tiny, tmp_path):
    """TRL's RewardTrainer subtracts a row's `margin` inside the sigmoid; the column was not read. A column of 2.0
    on every row gives --margin 2.0's loss; a bad value is a bad row naming the field; Plackett-Luce refuses it."""
    def first_loss(path, name, *extra):
        r = main(rm_args(world, tiny, tmp_path / name, "--max_steps", "1", "--data_path", str(path),
                         "--eval_data_path", "", "--per_device_train_batch_size", "4", *extra))
        return r["history"][0]["loss"]

    plain = _as_trl(world, tmp_path / "plain.json", None)
    column = _as_trl(world, tmp_path / "column.json", [2.0] * 8)
    assert read_preferences([str(column)], str(world / "images"))[3].margin == 2.0
    with_column, with_flag = first_loss(column, "c"), first_loss(plain, "f", "--margin", "2.0")
    assert with_column == pytest.approx(with_flag, abs=1e-5) and with_column > first_loss(plain, "p") + 0.5
    with pytest.raises(SystemExit, match="margin column"):
        first_loss(column, "pl", "--rank_loss", "plackett_luce")
    with pytest.raises(SystemExit, match="column.json.*margin column"):  # the held-out file's column was dropped
        main(rm_args(world, tiny, tmp_path / "pl2", "--max_steps", "1", "--data_path", str(plain), "--eval_data_path",
                     str(column), "--per_device_train_batch_size", "4", "--rank_loss", "plackett_luce"))
    bad = _as_trl(world, tmp_path / "bad.json", [0.0, 0.0, "big"] + [0.0] * 5)
    with pytest.raises(BadRowError) as e:
        first_loss(bad, "b")
    assert str(bad) in str(e.value) and "row 2" in str(e.value) and "margin" in str(e.value)


def test_quality_controls_take_every_pairs_image_and_facts_from_another_pair(world, monkeypatch):
    """The controls shuffled the pairs, which left some on their own image and facts (one of the 8 held-out pairs
    here): its control accuracy counted pairs scored as they are. A scorer that ranks a pair right only with its
    own image (or facts) must score 0 under each control."""
    import training.rm.data as rm_data
    import training.rm.model as rm_model
    from training.rm.quality import controls
    images = str(world / "images")
    recs = read_preferences([str(world / "preference_heldout.json")], images)
    owner = {resp: k for k, r in enumerate(recs) for resp in r.responses}
    pixels = [load_image(r.images[0], images).tobytes() for r in recs]

    class OwnOnly:  # chosen 1 and rejected 0 when image and facts are the pair's own, else a tie
        def __init__(self, *args, **kwargs):
            pass

        def score(self, prompts, imgs, responses, facts):
            own = [imgs[i][0].tobytes() == pixels[owner[x]] and facts[i] == recs[owner[x]].facts
                   for i, x in enumerate(responses)]
            return torch.tensor([float(o and i % 2 == 0) for i, o in enumerate(own)])

    monkeypatch.setattr(rm_model, "load_reward_model", lambda path: (SimpleNamespace(factual=True), None, None))
    monkeypatch.setattr(rm_data, "RewardScorer", OwnOnly)
    got = controls(Path("rm"), world / "preference_heldout.json", images)
    assert got == {"clean": 1.0, "image_from_other_scene": 0.0, "facts_from_other_scene": 0.0}


def test_blank_facts_are_no_facts_when_scoring_as_in_training(world, tiny):
    """Training (with_facts) and PPO take a row whose facts are all blank for a row without facts; best-of-n's
    check and score_records took it for one with facts and stopped in the factual block (MissingFacts). They now
    score such rows without the block, with the note, as they do rows with no facts at all."""
    from training.model.builder import load_model_and_processor
    from training.rm.data import missing_facts_note
    recs = read_preferences([str(world / "preference_heldout.json")], str(world / "images"))[:2]
    assert not missing_facts_note(recs, True)
    recs[1].facts = [" "]
    assert missing_facts_note(recs, True).startswith("note:")
    backbone, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                         for_training=False)
    scorer = RewardScorer(RewardModel(backbone, factual=True).eval(), processor, arch, 256)
    blank = scorer.score_records(recs, str(world / "images"), [r.responses[0] for r in recs])
    recs[1].facts = None
    torch.testing.assert_close(blank, scorer.score_records(recs, str(world / "images"), [r.responses[0] for r in recs]))


def test_held_out_rows_all_skipped_stop_before_training(world, tiny, tmp_path):
    """Held-out rows without facts for a factual reward model, skipped: the run trained, saved, then stopped in its
    final evaluation on no rows ("max() arg is an empty sequence") without writing bad_rows.json. It stops first."""
    rows = json.loads((world / "preference_heldout.json").read_text())
    for r in rows:
        del r["facts"]
    held = tmp_path / "held.json"
    held.write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="every held-out row is a bad row"):
        main(rm_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--eval_data_path", str(held), "--skip_bad_rows"))
    assert not (tmp_path / "o" / "value_head.safetensors").exists()


def test_held_out_rows_that_all_fail_to_encode_give_no_figures(world, tiny, tmp_path):
    """Held-out rows read well but each too long to encode (skipped as they are encoded, after training): the final
    metrics read accuracy 0.0 and rewards 0.0 over no rows. They are NaN now, with eval/n 0."""
    import math
    rows = json.loads((world / "preference_heldout.json").read_text())[:4]
    for r in rows:
        r["conversations"][0]["value"] += " more" * 600
    held = tmp_path / "held.json"
    held.write_text(json.dumps(rows))
    r = main(rm_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--eval_data_path", str(held), "--skip_bad_rows", "--max_seq_len", "256"))
    ev = r["eval"]
    assert ev["eval/n"] == 0 and all(math.isnan(v) for k, v in ev.items() if k != "eval/n"), ev


def test_a_non_finite_held_out_reward_stops_rather_than_passing_for_a_skipped_row(world, tiny, tmp_path, monkeypatch):
    """A NaN reward of a held-out response (an fp16 overflow) was taken for a skipped bad row: the row silently left
    the metrics, and with every row so the message said they were all bad rows."""
    from training.engine.strategy import NonFiniteError
    from training.rm.trainer import RMTrainer
    real, real_eval, evaluating = RMTrainer._rewards, RMTrainer.evaluate, []

    def evaluate(self):
        evaluating.append(True)
        return real_eval(self)

    def rewards(self, b):
        R, mask = real(self, b)
        return (R.index_fill(0, torch.tensor([0], device=R.device), float("nan")) if evaluating else R), mask
    monkeypatch.setattr(RMTrainer, "_rewards", rewards)
    monkeypatch.setattr(RMTrainer, "evaluate", evaluate)
    with pytest.raises(NonFiniteError, match="held-out evaluation: the reward model gave non-finite rewards"):
        main(rm_args(world, tiny, tmp_path / "o", "--max_steps", "1", "--per_device_train_batch_size", "4"))


def test_accumulation_over_lists_of_unequal_size_equals_one_batch(world, tiny, tmp_path):
    """Batch 4 x accumulation 1 and 1 x 4 give the same update when the micro-batches hold unequal numbers of pairs
    (mixed_lists): the loss is a mean over the step's pairs, not a mean of the micro-batches' means."""
    from safetensors.torch import load_file
    mixed = mixed_lists(world, tmp_path / "mixed.json")
    got = []
    for bs, accum in ((4, 1), (1, 4)):
        out = tmp_path / f"b{bs}"
        main(rm_args(world, tiny, out, *DIST_ARGS, *mixed, "--eval_data_path", "", "--per_device_train_batch_size",
                     str(bs), "--gradient_accumulation_steps", str(accum)))
        got.append({**load_file(str(out / "model.safetensors")), **load_file(str(out / "value_head.safetensors"))})
    init = load_file(str(tiny / "model.safetensors"))
    assert max(float((got[0][k] - init[k]).abs().max()) for k in init) > 1e-2  # the steps did something
    for k in got[0]:
        torch.testing.assert_close(got[1][k], got[0][k], rtol=0, atol=1e-5, msg=k)



def test_training_from_a_reward_model_starts_from_its_head(world, tiny, tmp_path):
    """--from_checkpoint naming a reward model (more training, on other pairs) kept its backbone and drew a new random
    head, dropping the trained one without a word. The run starts from the checkpoint's head: with a learning rate
    of 0 the saved head is the checkpoint's."""
    from safetensors.torch import load_file
    from sft_helpers import make_reward_model
    start = make_reward_model(tiny, tmp_path / "start", seed=5)
    main(rm_args(world, tiny, tmp_path / "more", "--from_checkpoint", str(start), "--max_steps", "1", "--optimizer",
                 "sgd", "--learning_rate", "0", "--per_device_train_batch_size", "4", "--eval_data_path", ""))
    before, after = (load_file(str(p / "value_head.safetensors")) for p in (start, tmp_path / "more"))
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


def test_training_shuffles_each_rows_facts_anew_each_epoch(world, tiny, tmp_path, monkeypatch):
    """The reward model trains on facts shuffled per (seed, epoch, row), as LLaVA-RLHF shuffles its captions. No
    test read the block's order: no shuffle at all, the same order in every epoch, or training with the evaluation's
    given order all passed."""
    import training.rm.data as rm_data
    seen, real = {}, rm_data.rm_messages

    def spy(prompt, response, facts=None, factual=False, shuffle_seed=None):
        out = real(prompt, response, facts, factual, shuffle_seed)
        block = out[-1].content.split("\n")[1:]
        assert sorted(block) == sorted(f.strip() for f in facts)  # the same facts, in some order
        seen.setdefault((tuple(facts), response), []).append(tuple(block))
        return out
    monkeypatch.setattr(rm_data, "rm_messages", spy)
    main(rm_args(world, tiny, tmp_path / "rm", "--max_steps", "8", "--per_device_train_batch_size", "4",
                 "--eval_data_path", ""))  # 4 steps an epoch: every row read in 2 epochs
    assert len(seen) >= 16 and all(len(orders) == 2 for orders in seen.values())
    assert any(orders[0] != tuple(f.strip() for f in facts) for (facts, _), orders in seen.items())
    assert any(orders[0] != orders[1] for orders in seen.values())
