"""Batch containers and collators shared by every stage.

    SFTBatch.input_ids       (B, T) long, right-padded with pad_id (left-padded for generation)
    SFTBatch.attention_mask  (B, T) long, 0 on padding: padding is never attended
    SFTBatch.labels          (B, T) long, -100 on prompt, image and padding positions
    SFTBatch.vision          dict of the processor's pixel inputs for the whole batch
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from training.templates.chat import IGNORE, PER_SAMPLE_VISION, Encoded


@dataclass
class SFTBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vision: dict = field(default_factory=dict)

    def to(self, device) -> "SFTBatch":
        mv = {k: v.to(device) for k, v in self.vision.items()}
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), mv)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision}

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def _pad_to(t: torch.Tensor, shape: list[int], value=0) -> torch.Tensor:
    pad = []
    for d in reversed(range(t.dim())):
        pad += [0, shape[d] - t.shape[d]]
    return F.pad(t, pad, value=value)


def collate_vision(items: list[dict], arch_name: str) -> dict:
    items = [v for v in items if v]
    if not items:
        return {}
    if arch_name in PER_SAMPLE_VISION:  # (1, n_images, ...) per sample: pad every dim, stack
        out = {}
        for k in items[0]:
            shape = [max(v[k].shape[d] for v in items) for d in range(items[0][k].dim())]
            out[k] = torch.cat([_pad_to(v[k], shape) for v in items], dim=0)
        return out
    return {k: torch.cat([v[k] for v in items], dim=0) for k in items[0]}  # one row per image


def collate_sft(encoded: list[Encoded], pad_id: int, arch_name: str, left_pad: bool = False) -> SFTBatch:
    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[i, sl], labels[i, sl], mask[i, sl] = e.input_ids, e.labels, 1
    vision = collate_vision([e.vision for e in encoded], arch_name)
    if "cross_attention_mask" in vision and left_pad:  # mllama rows follow the tokens
        cam = torch.zeros((B, T) + tuple(vision["cross_attention_mask"].shape[2:]), dtype=vision["cross_attention_mask"].dtype)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            cam[i, T - n:] = e.vision["cross_attention_mask"][0, :n]
        vision["cross_attention_mask"] = cam
    return SFTBatch(ids, mask, labels, vision)
