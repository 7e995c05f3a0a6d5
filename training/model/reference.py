"""The reference of a LoRA policy with no second model in memory: the policy with its adapters disabled AND
any other weights it trains (a projector, a vision tower: the freeze flags decide) put back to their starting
values for the reference's forwards. Adapters off alone gives the starting model only when nothing but the
adapters trains; the optimizer moves the rest, and the reference would move with it.

    start = snapshot(engine)         # before the first update (and before a resumed run loads its weights)
    with lora_reference(engine, start):
        ref_logits = model(...)      # the starting model
"""
from __future__ import annotations

import contextlib

import torch


def _inner(engine):
    return getattr(engine, "module", engine)  # a DeepSpeed engine wraps the peft model


def _trained_non_adapter(engine) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in _inner(engine).named_parameters() if p.requires_grad and "lora_" not in n}


@contextlib.contextmanager
def _gathered(params: list, modify: bool = False):
    """ZeRO-3 partitions parameters: gather them whole (and, with `modify`, write rank 0's values back to
    every rank's partition on exit); other stages hold them whole already."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def snapshot(engine) -> dict[str, torch.Tensor]:
    """The current values of the trainable parameters that are not LoRA adapters (empty when only adapters
    train). Under ZeRO-3 every rank keeps them whole: they are the small part of the model."""
    params = _trained_non_adapter(engine)
    with _gathered(list(params.values())), torch.no_grad():
        return {n: p.detach().clone() for n, p in params.items()}


@contextlib.contextmanager
def _values(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]):
    """Parameters set to the given values inside the block, their own values restored after it."""
    params = [p for p, _ in pairs]
    with _gathered(params, modify=True), torch.no_grad():
        own = [p.detach().clone() for p in params]
        for p, v in pairs:
            p.data.copy_(v)
    try:
        yield
    finally:
        with _gathered(params, modify=True), torch.no_grad():
            for p, v in zip(params, own):
                p.data.copy_(v)


@contextlib.contextmanager
def lora_reference(engine, start: dict[str, torch.Tensor]):
    """Forwards inside the block run the starting model: adapters disabled, `start` (from `snapshot`) in place
    of the other trained weights. Every rank enters it together (ZeRO-3 gathers are collective)."""
    params = _trained_non_adapter(engine)
    if set(params) != set(start):
        raise ValueError("the trainable parameters changed since the reference snapshot was taken")
    with _values([(params[n], v) for n, v in start.items()]) if start else contextlib.nullcontext():
        with _inner(engine).disable_adapter():
            yield
