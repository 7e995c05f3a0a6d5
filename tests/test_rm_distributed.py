"""Reward-model training at ZeRO 0, 1, 2 and 3 on two CPU ranks equals one rank with the whole batch, on ranks that
hold unequal numbers of pairs (test_rm.mixed_lists)."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from sft_helpers import run_two_ranks
from test_rm import DIST_ARGS, mixed_lists, rm_args

from training.rm.main import main


def _weights(out: Path) -> dict:
    return {**load_file(str(out / "model.safetensors")), **load_file(str(out / "value_head.safetensors"))}


def test_rm_zero_stages_on_two_ranks_match_single_rank(world, tiny, tmp_path):
    mixed = mixed_lists(world, tmp_path / "mixed.json")  # the driver trains on it too
    run_two_ranks("dist_rm_driver.py", world, tiny, tmp_path)
    single = main(rm_args(world, tiny, tmp_path / "single", "--per_device_train_batch_size", "4", *DIST_ARGS, *mixed))
    ref = _weights(tmp_path / "single")
    init = load_file(str(Path(tiny) / "model.safetensors"))
    assert sum(float((ref[k] - init[k]).abs().max()) for k in init) > 1e-3  # the steps did something
    for stage in range(4):
        out = tmp_path / f"zero{stage}"
        got = _weights(out)
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"zero{stage} {k}")
        ev = json.loads((out / "eval_metrics.json").read_text())  # held-out split over the two ranks
        assert ev["eval/n"] == single["eval"]["eval/n"] == 8
        for k, v in single["eval"].items():
            assert abs(ev[k] - v) <= 1e-4 * max(1.0, abs(v)), (stage, k)  # float32 reduction order
