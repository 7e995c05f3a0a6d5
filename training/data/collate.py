"""Batch containers and collators shared by every stage.

    SFTBatch.input_ids       (B, T) long, right-padded with pad_id (left-padded for generation)
    SFTBatch.attention_mask  (B, T) long, 0 on padding: padding is never attended
    SFTBatch.labels          (B, T) long, -100 on prompt, image and padding positions
    SFTBatch.vision          dict of the processor's pixel inputs for the whole batch
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.templates.chat import IGNORE, PER_SAMPLE_VISION, TOKEN_ALIGNED, Encoded, pad_cat


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


def collate_vision(items: list[dict], arch_name: str, lengths: list[int] | None = None,
                   left_pad: bool = False) -> dict:
    """One batch of pixel inputs from each sample's (`Encoded.vision`).

    Per-image inputs: one row per image (concatenated), or for PER_SAMPLE_VISION archs one row per
    sample with the images on dim 1 (samples with fewer images are zero-padded, read as no image).
    Token-aligned inputs (TOKEN_ALIGNED, (1, T_i, ...) per sample) become (B, T, ...), placed on the
    same side as input_ids, zeros on padding (no image token, attends to no image). `lengths`: the
    samples' token counts, needed when a sample has no images, or when its tokens differ from those
    its vision was encoded with (a prompt's vision reused under other responses): the rows are cut
    to the length, or extended as text after the last token (mm_token_type_ids 0; mllama's
    cross_attention_mask repeats its last row: text attends to the image(s) before it)."""
    present = [v for v in items if v]
    if not present:
        return {}
    out = {}
    for k in present[0]:
        if k in TOKEN_ALIGNED:
            ns = lengths or [v[k].shape[1] if v else 0 for v in items]
            T = max(ns)
            ref = present[0][k]
            t = torch.zeros((len(items), T) + tuple(max(v[k].shape[d] for v in present) for d in range(2, ref.dim())),
                            dtype=ref.dtype)
            for i, (v, n) in enumerate(zip(items, ns)):
                if v:
                    m = v[k][0, :n]
                    if m.shape[0] < n:
                        tail = m[-1:] if k == "cross_attention_mask" else torch.zeros_like(m[:1])
                        m = torch.cat([m, tail.expand(n - m.shape[0], *m.shape[1:])])
                    sl = slice(T - n, T) if left_pad else slice(0, n)
                    t[(i, sl) + tuple(slice(0, s) for s in m.shape[1:])] = m
            out[k] = t
        elif arch_name in PER_SAMPLE_VISION:  # (1, n_images, ...) per sample
            ref = present[0][k]
            rows = [v[k] if v else ref.new_zeros((1, 0) + tuple(ref.shape[2:])) for v in items]
            out[k] = pad_cat(rows, dim=0)
        else:  # one row per image: samples without images add no rows
            out[k] = pad_cat([v[k] for v in present], dim=0)
    return out


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
    vision = collate_vision([e.vision for e in encoded], arch_name, [len(e.input_ids) for e in encoded], left_pad)
    return SFTBatch(ids, mask, labels, vision)
