"""Run by tests/test_sft_distributed.py under `deepspeed --num_accelerators 2`: SFT at ZeRO 0-3, and QLoRA
(4-bit base + LoRA adapters) at ZeRO 3."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_helpers import sft_args  # noqa: E402

COMMON = ("--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.5")
QLORA = ("--qlora", "--lora_r", "4", "--lora_dropout", "0", "--freeze_vision_tower")

if __name__ == "__main__":
    from training.sft.main import main

    world, tiny, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    # all ranks local: DeepSpeed's CPU all-reduce then uses its /dev/shm segments (the test checks they go)
    assert os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE") == "2", dict(os.environ)
    for stage in (0, 1, 2, 3):
        main(sft_args(world, tiny, out / f"zero{stage}", "--zero_stage", str(stage), "--per_device_train_batch_size",
                      "2", *COMMON))
    main(sft_args(world, tiny, out / "qlora_zero3", "--zero_stage", "3", "--per_device_train_batch_size", "2",
                  *COMMON, *QLORA))
