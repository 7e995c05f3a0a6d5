"""SFT at ZeRO 0, 1, 2 and 3 on two CPU ranks equals one rank with the whole batch; QLoRA at ZeRO 3 too."""
import os
from pathlib import Path

import torch
from dist_sft_driver import COMMON, QLORA
from safetensors.torch import load_file
from sft_helpers import run_two_ranks, sft_args, weights

from training.sft.main import main


def test_zero_stages_on_two_ranks_match_single_rank(world, tiny, tmp_path):
    port = run_two_ranks("dist_sft_driver.py", world, tiny, tmp_path)
    # DeepSpeed never unlinks its CPU all-reduce segments (66 MB per rank per run, in RAM); the strategy does
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    main(sft_args(world, tiny, tmp_path / "single", "--per_device_train_batch_size", "4", *COMMON))
    ref, init = weights(tmp_path / "single"), weights(tiny)
    assert sum(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3
    for stage in range(4):
        got = weights(tmp_path / f"zero{stage}")
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"zero{stage} {k}")
    # QLoRA: the 4-bit base is quantised the same way on every rank, so the adapters match one rank's too
    main(sft_args(world, tiny, tmp_path / "qlora_single", "--per_device_train_batch_size", "4", *COMMON, *QLORA))
    a = load_file(str(tmp_path / "qlora_single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "qlora_zero3" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
