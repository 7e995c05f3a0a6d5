"""Attention for the packed shared-prefix layout (training.dpo.data.PrefixBatch): the items of a batch sit
one after another in ONE row with no padding, and each item attends only within itself, under its own
prefix mask (response k sees the prompt and itself).

The language model's attention implementation becomes "sdpa_prefix" (registered here): with the
keyword `prefix_layout` (passed through the model's forward kwargs, so gradient-checkpointing
recomputation gets it too) it gathers each item's queries, keys and values side by side, (N, H, T, D),
runs one SDPA call under the items' prefix masks and scatters the result back to the packed tokens;
without it, it is plain SDPA with the usual masks, so generation and every other forward are unchanged (but for
a model whose attention soft-caps its logits: SDPA has no soft-capping, so its other forwards differ).
A layer's sliding window (Mistral, Gemma 2, Phi-3) narrows each item's mask by position, as the plain masks do,
and attention-logit soft-capping (Gemma 2) runs the attention unfused (SDPA has none), as eager attention does.
Only attention sees the items padded to the longest; projections and MLPs run on real tokens only.
The implementation name is not saved with the checkpoint (transformers drops it from config.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_prefix"


def prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     prefix_layout=None, live: bool = False, **kwargs):
    """live: the queries are those of the layout's live positions alone (training.dpo.last_layer), (1, H, S_live, D);
    the keys and values those of every packed position."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: one key/value head per group
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    side = "live_" if live else ""  # the queries' slots: every position's, or the live positions' alone
    gather, q_gather, q_scatter, mask = (prefix_layout[k] for k in ("gather", side + "gather", side + "scatter",
                                                                    side + "mask"))
    n, tq, t = mask.shape[0], mask.shape[2], mask.shape[3]
    heads, dim = query.shape[1], query.shape[-1]
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window:  # keys less than `window` positions back, as the plain layout's sliding-window mask (by index)
        pos, q_pos = prefix_layout["positions"], prefix_layout[side + "positions"]
        mask = mask & ((q_pos[:, :, None] - pos[:, None, :]) < window)[:, None]
    # packed (1, H, S, D) -> per item (N, H, T, D): attention alone sees the items side by side
    q = query[0].index_select(1, q_gather).view(heads, n, tq, dim).transpose(0, 1)
    k, v = (x[0].index_select(1, gather).view(x.shape[1], n, t, dim).transpose(0, 1) for x in (key, value))
    if softcap:
        out = softcapped_attention(q, k, v, mask, dropout, dim ** -0.5 if scaling is None else scaling, softcap)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(n * tq, heads, dim).index_select(0, q_scatter)  # back to the packed tokens
    return out[None], None


def softcapped_attention(q, k, v, mask, dropout: float, scaling: float, softcap: float):
    """Attention with soft-capped logits, softcap * tanh(scores / softcap), under a boolean mask (N, 1, T, T);
    softmax in float32, as transformers' eager attention of Gemma 2."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), v)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the plain path builds SDPA's masks


def text_config(model):
    """The language model's config of a (DeepSpeed-, peft-wrapped) VLM."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "get_base_model", lambda: inner)()
    cfg = inner.config
    return getattr(cfg, "text_config", cfg)


def use_prefix_attention(model) -> None:
    """Switch the language model to sdpa_prefix and its last layer to training.dpo.last_layer's (idempotent). Only
    from SDPA or eager attention: both compute what the per-item SDPA computes."""
    from training.dpo.last_layer import run_last_layer_live

    cfg = text_config(model)
    if cfg._attn_implementation != NAME:
        if cfg._attn_implementation not in ("sdpa", "eager", None):
            raise ValueError(f"the packed DPO layout needs SDPA or eager attention in the language model, not "
                             f"{cfg._attn_implementation}: pass --no-fast_path")
        _register()
        cfg._attn_implementation = NAME
    run_last_layer_live(model)
