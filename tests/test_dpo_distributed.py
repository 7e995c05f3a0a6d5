"""DPO at ZeRO 0, 1, 2 and 3 on two CPU ranks (one deepspeed launch) equals one rank with the whole
batch; LoRA and QLoRA under ZeRO-3 too (reference = the policy with adapters off, cached before step 1)."""
import json

import pytest
import torch
from dist_dpo_driver import DIST_COMMON, QLORA, dpo_args, held_out_args
from safetensors.torch import load_file
from sft_helpers import run_two_ranks, weights

from training.dpo.main import main


def _single(world, tiny, out, *extra):
    common = list(DIST_COMMON)
    common[common.index("--per_device_train_batch_size") + 1] = "4"
    main(dpo_args(world, tiny, out, *common, *extra))


def test_zero_stages_on_two_ranks_match_single_rank(world, tiny, tmp_path):
    run_two_ranks("dist_dpo_driver.py", world, tiny, tmp_path)
    _single(world, tiny, tmp_path / "single", *held_out_args(world, tmp_path))
    ref, init = weights(tmp_path / "single"), weights(tiny)
    # held-out pairs scored under ZeRO-3 over two ranks (one rank with a discarded batch) = one rank's scores
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("zero3", "single")]
    evals = [[r for r in rs if "eval/loss" in r] for rs in rows]
    assert [r["step"] for r in evals[0]] == [1, 2] == [r["step"] for r in evals[1]] and evals[0][-1]["eval/n"] == 5
    for a, b in zip(*evals):
        for k in a:
            if k.startswith("eval/"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert sum(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3
    for stage in range(4):
        got = weights(tmp_path / f"zero{stage}")
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"zero{stage} {k}")
    _single(world, tiny, tmp_path / "lora_single", "--lora_r", "4", "--lora_dropout", "0")
    a = load_file(str(tmp_path / "lora_single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "lora_zero3" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # QLoRA: the reference (4-bit base, adapters off) equals the policy before its first update
    first = json.loads((tmp_path / "qlora_zero3" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    _single(world, tiny, tmp_path / "qlora_single", *QLORA)
    a = load_file(str(tmp_path / "qlora_single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "qlora_zero3" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
