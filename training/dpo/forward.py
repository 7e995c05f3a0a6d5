"""Per-response log-probs of a batch of GroupItems, in either layout (shared numerics: training.logprobs)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from training.dpo.data import PlainBatch, PrefixBatch
from training.dpo.packed import use_prefix_attention
from training.logprobs import IGNORE, token_logprobs


@dataclass
class ResponseLogps:
    """Reductions over each response's target tokens, all (N, K)."""
    sum: torch.Tensor  # sum of token log-probs
    count: torch.Tensor  # number of target tokens
    wsum: torch.Tensor  # sum of weight * token log-prob
    token_lp: torch.Tensor  # (N, K, L) per-token log-probs (0 off target), aligned by response position
    mask: torch.Tensor  # (N, K, L)
    weights: torch.Tensor  # (N, K, L) per-token weights

    @property
    def avg(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)


def response_logps(model, batch: PrefixBatch | PlainBatch) -> ResponseLogps:
    N, K = batch.n_items, batch.n_responses
    if isinstance(batch, PrefixBatch):
        use_prefix_attention(model)
    logits = model(**batch.model_inputs()).logits
    if isinstance(batch, PrefixBatch):  # (1, N*K*(Rmax+1), V) taken at `keep` -> one row per response
        logits = logits.reshape(N * K, -1, logits.shape[-1])
    lp, mask = token_logprobs(logits, batch.labels)  # (N*K, L)
    w = batch.weights[:, 1:].to(lp.dtype)
    mask = mask.to(lp.dtype)
    lp, mask, w = (x.view(N, K, -1) for x in (lp, mask, w))
    return ResponseLogps(lp.sum(-1), mask.sum(-1), (lp * w).sum(-1), lp, mask, w)


def target_counts(batch: PrefixBatch | PlainBatch) -> torch.Tensor:
    """(N, K) target tokens of each response, as response_logps counts them, read from the labels (no forward)."""
    return (batch.labels[:, 1:] != IGNORE).sum(-1).view(batch.n_items, batch.n_responses)


def adapters_disabled(module):
    """The reference of a LoRA policy: the same model with its adapters off (no second copy)."""
    inner = getattr(module, "module", module)  # a DeepSpeed engine wraps the peft model
    if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config"):
        return inner.disable_adapter()
    return contextlib.nullcontext()
