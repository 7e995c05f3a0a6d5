"""Run by tests/test_ppo_distributed.py under `deepspeed --num_accelerators 2`: PPO at ZeRO 0-3, and a LoRA
actor (reference = adapters off) and a QLoRA one at ZeRO-3."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sft_helpers import ppo_args  # noqa: E402

from training.ppo.main import main  # noqa: E402

world, tiny, rm, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
for stage in (0, 1, 2, 3):
    ptx = ["--ptx_coef", "0.5", "--ptx_data_path", str(world / "sft_train.json")] if stage == 3 else []
    main(ppo_args(world, tiny, rm, out / f"zero{stage}", "--zero_stage", str(stage), "--max_steps", "1",
                  "--rollout_batch_size", "2", "--max_new_tokens", "12", "--temperature", "1.5", *ptx))
main(ppo_args(world, tiny, rm, out / "zero3_lora", "--zero_stage", "3", "--max_steps", "2", "--rollout_batch_size", "2",
              "--max_new_tokens", "12", "--temperature", "1.5", "--lora_r", "4", "--lora_dropout", "0"))
main(ppo_args(world, tiny, rm, out / "zero3_qlora", "--zero_stage", "3", "--max_steps", "1", "--rollout_batch_size", "2",
              "--max_new_tokens", "12", "--temperature", "1.5", "--qlora", "--lora_r", "4", "--lora_dropout", "0",
              "--freeze_vision_tower"))
