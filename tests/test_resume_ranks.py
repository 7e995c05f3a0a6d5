"""Resuming across ranks: a two-rank ZeRO-2 run interrupted and resumed on two ranks ends as the uninterrupted one;
resumed on one rank it is refused, naming the ranks (the data order and each step's samples follow the rank count)."""
import json

import pytest
import torch
from dist_resume_driver import COMMON
from sft_helpers import run_two_ranks, sft_args, weights

from training.sft.main import main


def test_a_two_rank_run_resumes_on_two_ranks_exactly_and_is_refused_on_one(world, tiny, tmp_path):
    run_two_ranks("dist_resume_driver.py", world, tiny, tmp_path)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
            for k in ("full", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [r["step"] for r in rows["full"]] == [3, 4]
    assert [r["loss"] for r in rows["resumed"]] == pytest.approx([r["loss"] for r in rows["full"]], rel=1e-6)
    # one rank: another data order and half the samples per step; refused before DeepSpeed reads the shards
    out = tmp_path / "cut"
    config = (out / "run_config.json").read_text()
    with pytest.raises(SystemExit, match="world_size 2 in the checkpoint, 1 now"):
        main(sft_args(world, tiny, out, *COMMON, "--save_steps", "2", "--resume"))
    assert (out / "run_config.json").read_text() == config and (out / "checkpoints" / "step2").is_dir()
