"""SFT at ZeRO 0, 1, 2 and 3 on two CPU ranks equals one rank with the whole batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from sft_helpers import sft_args, weights

from training.sft.main import main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero_stages_on_two_ranks_match_single_rank(world, tiny, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = _free_port()
    cmd = [str(deepspeed), "--num_accelerators", "2", "--master_port", str(port),
           str(ROOT / "tests" / "dist_sft_driver.py"), str(world), str(tiny), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed never unlinks its CPU all-reduce segments (66 MB per rank per run, in RAM); the strategy does
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    main(sft_args(world, tiny, tmp_path / "single", "--max_steps", "2", "--per_device_train_batch_size", "4",
                  "--optimizer", "sgd", "--learning_rate", "0.5"))
    ref, init = weights(tmp_path / "single"), weights(tiny)
    assert sum(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3
    for stage in range(4):
        got = weights(tmp_path / f"zero{stage}")
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"zero{stage} {k}")
