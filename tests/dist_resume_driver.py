"""Run by tests/test_resume_ranks.py under `deepspeed --num_accelerators 2`: SFT at ZeRO 2 (each rank's share of
the optimizer state in its own file) uninterrupted, and interrupted at step 2 then resumed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_helpers import sft_args  # noqa: E402

COMMON = ("--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--zero_stage", "2",
          "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1", "--logging_steps", "3")

if __name__ == "__main__":
    from training.sft.main import main

    world, tiny, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    main(sft_args(world, tiny, out / "full", *COMMON))
    r = main(sft_args(world, tiny, out / "cut", *COMMON, "--save_steps", "2", "--stop_after_steps", "2"))
    assert r["interrupted"], r
    main(sft_args(world, tiny, out / "resumed", *COMMON, "--save_steps", "2", "--stop_after_steps", "2"))
    main(sft_args(world, tiny, out / "resumed", *COMMON, "--save_steps", "2", "--resume"))
