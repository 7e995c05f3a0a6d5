"""Log-prob gathering and masked reductions: the numeric code every stage shares (it exists once).

Convention: logits (B, T, V) predict token t+1 at position t; labels (B, T) hold -100 where a
position is not a target. All functions shift internally, so callers pass aligned tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


SUPPRESSED = -1e30  # a suppressed token's logit: probability exactly 0 in float32, and no inf * 0 in an entropy


def _target_rows(logits: torch.Tensor, labels: torch.Tensor, temperature: float, suppressed=()):
    """The logits of the target positions only, float32, / temperature: (n, V), their labels (n,), where they
    sit (B, T-1) and the mask. Prompt positions (a VLM's hundreds of image tokens) are never upcast. suppressed:
    token ids the sampler never draws (generate's suppress_tokens), out of the softmax as they are out of its."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    where = mask.nonzero(as_tuple=True)
    rows = logits[where].float()
    rows = rows / temperature if temperature != 1.0 else rows
    if len(suppressed):
        rows = rows.index_fill(-1, torch.as_tensor(list(suppressed), device=rows.device), SUPPRESSED)
    return rows, labels[where], where, mask


def _placed(values: torch.Tensor, where, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put(where, values)


def _logprobs_placed(rows, target, where, mask) -> torch.Tensor:
    return _placed(-F.cross_entropy(rows, target, reduction="none"), where, mask)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   suppressed=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) under softmax(logits / temperature) (the suppressed ids left out) and its mask, both
    (B, T-1); masked positions hold 0."""
    rows, target, where, mask = _target_rows(logits, labels, temperature, suppressed)
    return _logprobs_placed(rows, target, where, mask), mask


def token_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                           entropy_grad: bool = True, suppressed=()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_logprobs and the entropy of softmax(logits / temperature) at the same positions, (B, T-1) each;
    entropy_grad False: the entropy is a metric only (no graph kept of its vocabulary-wide terms)."""
    rows, target, where, mask = _target_rows(logits, labels, temperature, suppressed)
    lp = _logprobs_placed(rows, target, where, mask)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        logz = torch.log_softmax(rows, -1)
        ent = _placed(-(logz.exp() * logz).sum(-1), where, mask)
    return lp, mask, ent


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


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood over target tokens and the number of target tokens (a tensor where the logits
    are: reading it to the host waits for the device)."""
    lp, mask = token_logprobs(logits, labels)
    return -lp.sum(), mask.sum()
