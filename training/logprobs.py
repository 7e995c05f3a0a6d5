"""Log-prob gathering and masked reductions: the numeric code every stage shares (it exists once).

Convention: logits (B, T, V) predict token t+1 at position t; labels (B, T) hold -100 where a
position is not a target. All functions shift internally, so callers pass aligned tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and its mask, both (B, T-1); masked positions hold 0."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    # cross_entropy avoids materialising a second (B, T, V) tensor of log-softmax
    lp = -F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1),
                          reduction="none").view(labels.shape)
    return lp * mask, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B,) sum (or mean) of target-token log-probs per sequence."""
    lp, mask = token_logprobs(logits, labels)
    s = lp.sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood over target tokens and the number of target tokens."""
    lp, mask = token_logprobs(logits, labels)
    return -lp.sum(), int(mask.sum())
