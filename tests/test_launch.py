"""scripts/env.sh's `launch`: the deepspeed launcher's arguments for the ranks asked for (a stand-in
`deepspeed` on PATH prints them)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launch(tmp_path, **env) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "deepspeed").write_text('#!/usr/bin/env bash\necho "$@"\n')
    (fake / "deepspeed").chmod(0o755)
    script = (f'source scripts/env.sh; export PATH="{fake}:$PATH"; unset DS_ACCELERATOR; '
              'launch training.sft.main --x 1')
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE")}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env={**base, "MASTER_PORT": "29999", **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env, want", [
    ({}, ""),
    ({"NUM_GPUS": "2"}, "--num_gpus 2 "),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "--include localhost:2,3 "),
    # the launcher dropped CUDA_VISIBLE_DEVICES when given --num_gpus: GPUs 0 and 1 ran instead of 2 and 3
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "2"}, "--include localhost:2,3 "),
    ({"CUDA_VISIBLE_DEVICES": "5,1,7", "NUM_GPUS": "2"}, "--include localhost:5,1 "),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "HOSTFILE": "hosts"}, "--hostfile hosts "),
])
def test_launch_arguments(tmp_path, env, want):
    p = _launch(tmp_path, **env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"{want}--master_port 29999 --module training.sft.main --x 1"


def test_more_gpus_than_visible_devices_stops(tmp_path):
    p = _launch(tmp_path, CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="4")
    assert p.returncode == 2 and "NUM_GPUS=4 but CUDA_VISIBLE_DEVICES=2,3 names 2 device(s)" in p.stderr
