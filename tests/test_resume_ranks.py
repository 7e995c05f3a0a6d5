"""Resuming across ranks: a two-rank ZeRO-2 run interrupted and resumed on two ranks ends as the uninterrupted one;
resumed on one rank it is refused, naming the ranks (the data order and each step's samples follow the rank count)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_resume_driver import COMMON
from sft_helpers import sft_args, weights

from training.sft.main import main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_two_rank_run_resumes_on_two_ranks_exactly_and_is_refused_on_one(world, tiny, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
           str(_free_port()), str(ROOT / "tests" / "dist_resume_driver.py"), str(world), str(tiny), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
