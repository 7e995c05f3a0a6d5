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
# generating with ZeRO's per-module gathers (synced_gpus) rather than the whole actor gathered, as the runs above
main(ppo_args(world, tiny, rm, out / "zero3_lora", "--zero_stage", "3", "--max_steps", "2", "--rollout_batch_size", "2",
              "--max_new_tokens", "12", "--temperature", "1.5", "--lora_r", "4", "--lora_dropout", "0",
              "--no-gather_for_generation"))
main(ppo_args(world, tiny, rm, out / "zero3_qlora", "--zero_stage", "3", "--max_steps", "1", "--rollout_batch_size", "2",
              "--max_new_tokens", "12", "--temperature", "1.5", "--qlora", "--lora_r", "4", "--lora_dropout", "0",
              "--freeze_vision_tower"))


def lora_reference_at_zero3() -> None:
    """training.model.reference under ZeRO-3 on 2 ranks: after every trainable weight moved (adapters, projector,
    vision tower), the reference's logits are the starting model's and the moved weights are back after it."""
    import json

    import deepspeed
    import numpy as np
    import torch
    from PIL import Image

    from training.config import DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs
    from training.engine.strategy import Strategy
    from training.model.builder import load_model_and_processor
    from training.model.reference import lora_reference, snapshot

    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)),
                                                 LoraArgs(lora_r=4, lora_dropout=0))
    engine = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "fp32").prepare(model, 10)
    start = snapshot(engine)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=0), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    frozen, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    b = dict(proc(text=[f"{arch.image_token} a red circle"], images=[image], return_tensors="pt"))
    with torch.no_grad():
        want = frozen(**b).logits
        before = engine.module(**b).logits
        with lora_reference(engine, start):
            got = engine.module(**b).logits
        after = engine.module(**b).logits
    rank = torch.distributed.get_rank()
    (out / f"lora_reference_rank{rank}.json").write_text(json.dumps({
        "reference_vs_start": float((got - want).abs().max()), "moved_vs_start": float((before - want).abs().max()),
        "after_vs_before": float((after - before).abs().max())}))


lora_reference_at_zero3()
