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
    inputs = batch.model_inputs()
    if isinstance(batch, PrefixBatch):
        use_prefix_attention(model)
        if batch.rope is not None:
            inputs["position_ids"] = mrope_position_ids(model, batch)
    logits = model(**inputs).logits
    if isinstance(batch, PrefixBatch):  # (1, N*K*(Rmax+1), V) taken at `keep` -> one row per response
        logits = logits.reshape(N * K, -1, logits.shape[-1])
    lp, mask = token_logprobs(logits, batch.labels)  # (N*K, L)
    w = batch.weights[:, 1:].to(lp.dtype)
    mask = mask.to(lp.dtype)
    lp, mask, w = (x.view(N, K, -1) for x in (lp, mask, w))
    return ResponseLogps(lp.sum(-1), mask.sum(-1), (lp * w).sum(-1), lp, mask, w)


def mrope_position_ids(model, batch: PrefixBatch) -> torch.Tensor:
    """(3, 1, S) multimodal positions of a packed batch (Qwen2-VL / 2.5-VL): each prompt's from the model's
    get_rope_index over the prompt alone; a response token's are its 1D position plus its item's offset, the
    positions a plain forward of [prompt | response] gives it (the prompt ends in text)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "get_base_model", lambda: inner)()
    r = batch.rope
    grid = {"image_grid_thw": r["image_grid_thw"]} if "image_grid_thw" in r else {}
    prompt, offset = inner.model.get_rope_index(r["input_ids"], r["mm_token_type_ids"],
                                                attention_mask=r["attention_mask"], **grid)
    out = (batch.position_ids[0] + offset[:, 0].to(batch.position_ids.device)[r["token_item"]]).expand(3, -1).clone()
    out[:, r["prompt_rows"]] = prompt.flatten(1)[:, r["prompt_src"]].to(out.dtype)
    return out[:, None]


def target_counts(batch: PrefixBatch | PlainBatch) -> torch.Tensor:
    """(N, K) target tokens of each response, as response_logps counts them, read from the labels (no forward)."""
    return (batch.labels[:, 1:] != IGNORE).sum(-1).view(batch.n_items, batch.n_responses)


def adapters_disabled(module):
    """The reference of a LoRA policy: the same model with its adapters off (no second copy)."""
    inner = getattr(module, "module", module)  # a DeepSpeed engine wraps the peft model
    if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config"):
        return inner.disable_adapter()
    return contextlib.nullcontext()
