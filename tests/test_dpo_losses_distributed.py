"""ORPO (a token mean over the chosen answers of the whole step), OPA-DPO's DPO step (rows read in twos) and
listwise DPO over lists of unequal size on two CPU ranks equal one rank with the whole batch, at the ZeRO stages
of dist_dpo_losses_driver.py."""
import json
from pathlib import Path

import pytest
import torch
from dist_dpo_driver import dpo_args
from dist_dpo_losses_driver import SGD, STAGES, runs
from sft_helpers import run_two_ranks, weights
from test_dpo_opa_invariance import opa_pairs
from test_rm import mixed_lists

from training.dpo.main import main


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_losses_on_two_ranks_match_one_rank(world, tiny, tmp_path):
    opa_pairs(world, tmp_path / "pairs.json")
    mixed_lists(world, tmp_path / "mixed.json")
    run_two_ranks("dist_dpo_losses_driver.py", world, tiny, tmp_path)
    init = weights(tiny)
    for name, args in runs(tmp_path):
        main(dpo_args(world, tiny, tmp_path / name, *args, *SGD, "--per_device_train_batch_size", "4"))
        ref, want = weights(tmp_path / name), _rows(tmp_path / name)
        assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3, name
        for stage in STAGES[name]:
            got = weights(tmp_path / f"{name}{stage}")
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"{name} zero{stage} {k}")
            for a, b in zip(_rows(tmp_path / f"{name}{stage}"), want):
                for k in ("loss", "rewards/margins", "logps/chosen", *(("nll_loss",) if name == "orpo" else ())):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (name, stage, a["step"], k)
