"""The optimizer a trained model gets: weight-decay groups, AdamW (fused where torch has it), SGD or DeepSpeed's CPU
Adam, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from training.config import OptimArgs, warmup_steps

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at optimizer step s (0-based), as transformers' get_scheduler (what
    Trainer, so TRL, runs): warm-up s / warmup from 0 at step 0, then cosine or linear to 0 at `total`; "constant"
    has no warm-up. Written here (tests/test_strategy.py holds it to get_scheduler at every step): importing
    transformers.optimization costs ~60 MB."""
    def f(s: int) -> float:
        if kind == "constant":
            return 1.0
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        return max(0.0, (total - s) / max(1, total - warmup))  # linear
    return f


def schedule(optimizer, o: OptimArgs, total: int):
    """The learning-rate schedule of `o` over `total` optimizer steps (its warm-up: training.config.warmup_steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.lr_scheduler_type, warmup_steps(o, total), total))


# transformers' Trainer.get_decay_parameter_names (5.23), its name patterns: importing Trainer itself costs ~90 MB
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decayed_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters weight decay applies to, by transformers' Trainer rule (so TRL's): not biases, not norm
    layers' weights (Vision-LLM-Alignment also exempts bias and LayerNorm.weight)."""
    from transformers.trainer_pt_utils import get_parameter_names
    return set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))


def build_optimizer(model: torch.nn.Module, named: list, o: OptimArgs, offloaded: bool):
    """The optimizer of model's trainable parameters `named` ([(name, parameter)]): weight decay on those
    `decayed_parameter_names` gives; DeepSpeed's CPU Adam when `offloaded` (the run's ZeRO config offloads the
    optimizer)."""
    params = [p for _, p in named]
    decayed = decayed_parameter_names(model)
    groups = [g for g in ({"params": [p for n, p in named if n in decayed], "weight_decay": o.weight_decay},
                          {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0})
              if g["params"]]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.learning_rate)
    if offloaded:  # --offload's, or the user config's (CPU or NVMe)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=o.learning_rate)
    # fused (one kernel over all parameters, as transformers' Trainer and so TRL default to) where
    # torch has it; its per-parameter loop otherwise
    fused = all(p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=o.learning_rate, fused=fused or None)
