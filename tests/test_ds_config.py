"""training/engine/ds_config.py's pure parts, without an engine: the trained model's batch sizes on several ranks,
and a frozen model's ZeRO-3 config (tests/test_strategy.py covers the user config against the flags)."""
from training.config import DeepSpeedArgs, OptimArgs
from training.engine.ds_config import engine_config


def test_the_global_batch_counts_every_rank():
    """micro-batch 4 x accumulation 3 on 2 ranks: 24 samples a step (DeepSpeed checks the three agree)."""
    o = OptimArgs(per_device_train_batch_size=4, gradient_accumulation_steps=3)
    cfg = engine_config(DeepSpeedArgs(), o, "fp32", {}, world_size=2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        4, 3, 24)