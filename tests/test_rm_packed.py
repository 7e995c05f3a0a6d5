"""The reward model's fast path: every ranked list in one packed row (DPO's shared-prefix layout), the image and the
tokens its candidates share computed once, the reward read at each candidate's last token. Its rewards and
gradients equal the padded rows' on every family the layout covers, factual or not, for pairs and longer lists;
and the stage trains alike on both paths."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sft_helpers import assert_same_grads

from training.config import LoraArgs, ModelArgs
from training.data.records import Message
from training.dpo.data import PREFIX_ARCHS
from training.model.builder import load_model_and_processor
from training.model.tiny_archs import make_tiny_checkpoint
from training.rm.data import collate_ranked, encode_for_rm, pack_lists
from training.rm.model import RewardModel
from training.templates.chat import ChatEncoder

LISTS = [  # (prompt, candidates best first, image size or None)
    ("<image>\nDescribe the image in detail.", ["One red circle.", "Two red circles and one blue star.",
                                                "A cross."], (32, 32)),
    ("What is a star?", ["A shape with points.", "A circle."], None),
    ("<image>\nWhat is shown?", ["A green square on a white table, and nothing else at all.", "A square."], (48, 32)),
]
FACTS = ["a red circle on a white table.", "there is no star."]


def _img(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _items(processor, spec, factual: bool):
    enc = ChatEncoder(processor, spec, 512)
    return [[encode_for_rm(enc, [Message("user", q)], r, [_img(i, size)] if size else [], FACTS, factual=factual)
             for r in cands] for i, (q, cands, size) in enumerate(LISTS)]


@pytest.mark.parametrize("arch", sorted(PREFIX_ARCHS))
@pytest.mark.parametrize("factual", [True, False])
def test_packed_rewards_and_gradients_equal_the_padded_rows(arch, factual, tmp_path):
    ckpt = make_tiny_checkpoint(arch, tmp_path / "base")
    torch.manual_seed(0)
    backbone, processor, spec = load_model_and_processor(ModelArgs(from_checkpoint=ckpt), LoraArgs())
    rm = RewardModel(backbone, factual=factual).eval()
    items = _items(processor, spec, factual)
    params = [p for p in rm.parameters() if p.requires_grad]
    out = {}
    for fast in (False, True):
        b = collate_ranked(items, processor.tokenizer.pad_token_id, spec.name, fast=fast)
        assert (b.packed is not None) == fast and b.n_tokens == sum(len(e.input_ids) for c in items for e in c)
        R, mask = b.as_matrix(rm(**b.model_inputs()))
        out[fast] = R.detach(), torch.autograd.grad(R[mask].sum(), params, allow_unused=True)
    (R0, g0), (R1, g1) = out[False], out[True]
    assert R0.shape == (3, 3) and R0[mask].abs().min() > 0
    torch.testing.assert_close(R1, R0, rtol=0, atol=1e-4)
    assert_same_grads(g1, g0)


def test_each_list_shares_its_longest_common_prefix_and_every_candidate_keeps_a_token(tmp_path):
    ckpt = make_tiny_checkpoint("llava", tmp_path / "base")
    _, processor, spec = load_model_and_processor(ModelArgs(from_checkpoint=ckpt), LoraArgs(), for_training=False)
    items = _items(processor, spec, factual=True)
    same = [items[1][0], items[1][0]]  # a candidate twice: the prefix stops one token short of the end
    packed, read_at = pack_lists(items + [same], processor.tokenizer.pad_token_id, spec.name)
    ids, want = packed.input_ids[0], 0
    for cands in items + [same]:  # the packed row holds each list's shared prefix once, then every candidate's rest
        full = [e.input_ids for e in cands]
        P = min(len(x) for x in full) - 1
        while any(not torch.equal(x[:P], full[0][:P]) for x in full):
            P -= 1
        assert P > 10  # the image and the prompt at least
        want += P + sum(len(x) - P for x in full)
    assert len(ids) == want
    # each candidate's last token is where its reward is read, and it is that candidate's last token
    last = [e.input_ids[-1] for c in items + [same] for e in c]
    assert torch.equal(ids[read_at], torch.stack(last)) and len(set(read_at.tolist())) == len(last)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_stage_fast_and_plain_paths_train_alike(arch, world, tmp_path):
    """Batch 4 packed == batch 1 x accumulation 4 padded: one SGD step is the gradient, so the losses, held-out
    accuracy and weights agree."""
    from sft_helpers import weights

    from training.rm.main import main

    tiny = make_tiny_checkpoint(arch, tmp_path / arch)
    common = ["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"), "--image_folder",
              str(world / "images"), "--no-progress", "--logging_steps", "1", "--optimizer", "sgd",
              "--learning_rate", "0.5", "--max_steps", "2", "--num_warmup_steps", "0", "--lr_scheduler_type",
              "constant", "--eval_data_path", str(world / "preference_heldout.json"), "--max_seq_len", "512",
              "--center_coef", "0"]  # (centering is a per-micro-batch term)
    main(common + ["--output_dir", str(tmp_path / "a"), "--figure_dir", str(tmp_path / "fa"),
                   "--per_device_train_batch_size", "4"])
    main(common + ["--output_dir", str(tmp_path / "b"), "--figure_dir", str(tmp_path / "fb"),
                   "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--no-fast_path"])
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert max((a[k] - v).abs().max().item() for k, v in weights(tiny).items() if k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    losses = [[r["loss"] for r in rr if "loss" in r] for rr in rows]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    evals = [json.loads((tmp_path / d / "eval_metrics.json").read_text()) for d in "ab"]
    assert evals[0]["eval/loss"] == pytest.approx(evals[1]["eval/loss"], rel=1e-4)
