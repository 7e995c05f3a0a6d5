"""Run by tests/test_zero3_partitioned.py under `deepspeed --num_accelerators 2`: every stage at ZeRO-3 on a tiny
LLaVA (CLIP tower), whose models are built partitioned (deepspeed.zero.Init): SFT (full with gradient checkpointing,
and LoRA), DPO with a separate frozen reference, the reward model, and PPO (actor, reference, reward model and
critic). Each rank records, for every model the builder returned, how many of its parameters were partitioned."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dist_dpo_driver import DIST_COMMON, dpo_args  # noqa: E402
from dist_sft_driver import COMMON  # noqa: E402
from sft_helpers import ppo_args, sft_args  # noqa: E402
from test_rm import DIST_ARGS, rm_args  # noqa: E402

import training.model.builder as builder  # noqa: E402

LORA = ("--lora_r", "4", "--lora_dropout", "0")
SFT = ("--per_device_train_batch_size", "2", *COMMON)
LONG = ("--max_seq_len", "1024")  # the tiny LLaVA's byte-level tokenizer spends more tokens on a factual block
RM = ("--per_device_train_batch_size", "2", *DIST_ARGS, *LONG)
PPO = (*LONG, "--max_steps", "1", "--rollout_batch_size", "2", "--max_new_tokens", "6", "--temperature", "1.5")


def recording(load, seen: list):
    def wrapped(*args, **kwargs):
        model, processor, spec = load(*args, **kwargs)
        # a LoRA model's adapters are made after the load (DeepSpeed partitions them as the engine starts)
        params = [p for n, p in model.named_parameters() if "lora_" not in n]
        seen.append({"for_training": kwargs.get("for_training", True), "zero3": kwargs.get("zero3") is not None,
                     "params": len(params), "partitioned": sum(hasattr(p, "ds_id") for p in params)})
        return model, processor, spec
    return wrapped


if __name__ == "__main__":
    import torch

    from training.dpo.main import main as dpo
    from training.ppo.main import main as ppo
    from training.rm.main import main as rm
    from training.sft.main import main as sft

    world, llava, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))
    seen: list = []
    builder.load_model_and_processor = recording(builder.load_model_and_processor, seen)
    z3 = ("--zero_stage", "3")
    sft(sft_args(world, llava, out / "sft", *z3, *SFT, "--gradient_checkpointing"))  # as the 8x A100 profile
    sft(sft_args(world, llava, out / "sft_lora", *z3, *SFT, *LORA))
    dpo(dpo_args(world, llava, out / "dpo", *z3, *DIST_COMMON, "--no-precompute_ref"))
    rm(rm_args(world, llava, out / "rm", *z3, *RM))
    ppo(ppo_args(world, llava, out / "rm", out / "ppo", *z3, *PPO))
    (out / f"loads_rank{torch.distributed.get_rank()}.json").write_text(json.dumps(seen))
