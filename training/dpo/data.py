"""Preference data for the DPO family: one prompt (with its image) and K ranked responses per item.

Two batch layouts give the same per-response log-probs (tested to 1e-4):

  PlainBatch   K full sequences per item, [prompt | response_k] each, right-padded: what TRL does
               (the image is encoded and the prompt computed once per response).
  PrefixBatch  every item as [prompt | response_1 | ... | response_K], the items packed one after
               another in ONE row with no padding; response k sees the prompt and itself only (each
               item's mask, applied by training.dpo.packed's attention) and its positions restart
               after the prompt, so every response sees exactly what it sees in the plain layout.
               The image is encoded once, the prompt (image tokens + question) computed once, the
               projections and MLPs see no padding (only attention lays the items side by side), and
               logits are built only where a response token is predicted (`logits_to_keep`), so the
               last layer runs whole only there (training.dpo.last_layer).

Shapes (N items, K responses, T row length, L label length):
  PrefixBatch.input_ids / position_ids (1, sum of item lengths); layout: gather (N*T,) / scatter
  (sum of item lengths,) indices between the packed row and N item slots of T, the items' masks
  (N, 1, T, T) for attention and their slots' positions (N, T), and the same for the live positions alone
  (`live_queries`); keep (1, N*K*(Rmax+1)) positions whose
  logits predict labels; labels, weights (N*K, Rmax+1) aligned with the logits taken at `keep`
  (labels[:, 0] is IGNORE: token_logprobs shifts by one).
  PlainBatch.input_ids / attention_mask / labels / weights (N*K, T).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.data.bad_rows import alike_reason, cut_alike
from training.data.collate import collate_vision
from training.data.images import load_image
from training.data.records import Message
from training.templates.chat import IGNORE, ChatEncoder, RowNotEncodable

# Architectures whose image features fill their image tokens in order (LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, its
# tiles included; Qwen2-VL / 2.5-VL), so a custom 4D mask + position_ids reproduce the plain forward. The language
# model takes plain 1D positions, or for MROPE_ARCHS multimodal ones, each prompt's from the model's own
# get_rope_index (training.dpo.forward). mllama (cross-attention) uses PlainBatch.
MROPE_ARCHS = {"qwen2_vl", "qwen2_5_vl"}
PREFIX_ARCHS = {"llava", "llava_next", "idefics3"} | MROPE_ARCHS


@dataclass
class GroupItem:
    """One prompt and its K responses (best first), tokenised; weights are optional per-token weights."""
    index: int  # position in the dataset (the key of the reference log-prob cache)
    prompt_ids: torch.Tensor  # (P,)
    vision: dict
    responses: list[torch.Tensor]  # K x (R_k,) token ids
    targets: list[torch.Tensor]  # K x (R_k,) labels (IGNORE where not a target)
    weights: list[torch.Tensor | None] = field(default_factory=list)
    truncated: bool = False  # a response was cut at max_seq_len


def encode_group(encoder: ChatEncoder, prompt: list[Message], responses: list[str], images: list,
                 index: int, weights: list[list[float] | None] | None = None) -> GroupItem:
    """Encode prompt + each response with the shared chat-template layer; split at prompt_len."""
    prompt_ids, vision, resp, tgt, memo, cut = None, {}, [], [], {}, False
    for text in responses:  # the prompt (and its image) is processed once, for the first response
        e = encoder.encode(prompt + [Message("assistant", text)], images, memo=memo)
        p = e.input_ids[:e.prompt_len]
        if prompt_ids is None:
            prompt_ids, vision = p, e.vision
        elif not torch.equal(p, prompt_ids):
            raise ValueError(f"item {index}: the prompt tokenises differently before different responses")
        resp.append(e.input_ids[e.prompt_len:])
        tgt.append(e.labels[e.prompt_len:])
        cut = cut or e.truncated
    w = [None if x is None else torch.tensor(x[:len(r)], dtype=torch.float32) for x, r in
         zip(weights or [None] * len(resp), resp)]
    return GroupItem(index, prompt_ids, vision, resp, tgt, w, cut)



class PreferenceDataset(torch.utils.data.Dataset):
    """PreferenceRecords -> GroupItems (lazily; images decoded when a batch is built).
    n_responses: 2 for pairwise losses (best, second), 0 for all (listwise)."""

    def __init__(self, records, encoder: ChatEncoder, image_root: str, report, n_responses: int = 2):
        self.records, self.encoder, self.image_root, self.report = records, encoder, image_root, report
        self.n_responses = n_responses

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i) -> GroupItem | None:
        r = self.records[i]
        images = [load_image(src, self.image_root) for src in r.images]
        responses = r.responses[:self.n_responses] if self.n_responses else r.responses
        try:
            item = encode_group(self.encoder, r.prompt, responses, images, i)
        except RowNotEncodable as e:
            self.report.bad(r.source, r.text_field, str(e), item=(self, i))
            return None
        if cut_alike(responses, item.responses):
            self.report.bad(r.source, r.text_field, alike_reason(item.truncated, self.encoder.max_seq_len),
                            item=(self, i))
            return None
        if r.weights:
            from training.data.span_weights import WEIGHT_KEYS
            from training.dpo.weights import WeightsNotPlaced, weighted_responses
            none = [None] * len(responses)  # (listwise: the weights are of the best and the second response)
            try:
                item.weights = weighted_responses(self.encoder, r.prompt, responses, r.weights + none, item.responses,
                                                  WEIGHT_KEYS + ("",) * len(responses))
            except WeightsNotPlaced as err:
                self.report.bad(r.source, err.field, str(err), item=(self, i))
                return None
        if item.truncated:
            self.report.truncated(r.source, (self, i))
        return item


def _weights(item: GroupItem, k: int) -> torch.Tensor:
    w = item.weights[k] if k < len(item.weights) else None
    return torch.ones(len(item.responses[k])) if w is None else w


@dataclass
class PrefixBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: dict  # gather (N*T,), scatter (sum T_i,), mask (N, 1, T, T), positions (N, T): training.dpo.packed;
    # live_*: the positions whose logits are taken (live_queries), for training.dpo.last_layer
    keep: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    vision: dict
    n_items: int
    n_responses: int
    indices: list[int]
    rope: dict | None = None  # MROPE_ARCHS: the inputs of each prompt's multimodal positions (mrope_inputs)

    def to(self, device) -> "PrefixBatch":
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "keep", "labels", "weights")}
        moved = [None if d is None else {k: v.to(device) for k, v in d.items()}
                 for d in (self.layout, self.vision, self.rope)]
        return PrefixBatch(**t, layout=moved[0], vision=moved[1], n_items=self.n_items, n_responses=self.n_responses,
                           indices=self.indices, rope=moved[2])

    def model_inputs(self) -> dict:
        # a ready 4D mask is passed through untouched; training.dpo.packed's attention ignores it and
        # applies each item's own mask from prefix_layout
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.input_ids.device)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": placeholder,
                "prefix_layout": self.layout, "logits_to_keep": self.keep, "use_cache": False, **self.vision}


def collate_prefix(items: list[GroupItem], pad_id: int, arch_name: str) -> PrefixBatch:
    """All items packed in one row, [prompt | response_1 | ... | response_K] each, no padding."""
    N, K = len(items), max(len(it.responses) for it in items)
    rmax = max(len(r) for it in items for r in it.responses)
    lengths = [len(it.prompt_ids) + sum(len(r) for r in it.responses) for it in items]
    T = max(lengths)
    ids, pos = [], []
    seg = torch.full((N, T), -1, dtype=torch.long)  # 0 prompt, k+1 response k, -1 padding (attention only)
    gather = torch.zeros((N, T), dtype=torch.long)  # packed position of each (item, slot); padding -> 0
    scatter = []  # (item, slot) of each packed position, flattened
    keep = torch.zeros((N, K, rmax + 1), dtype=torch.long)
    labels = torch.full((N, K, rmax + 1), IGNORE, dtype=torch.long)
    weights = torch.zeros((N, K, rmax + 1))
    offset = 0
    for n, it in enumerate(items):
        P, L = len(it.prompt_ids), lengths[n]
        ids.append(it.prompt_ids)
        pos.append(torch.arange(P))
        seg[n, :P] = 0
        start = P
        for k, (r, tgt) in enumerate(zip(it.responses, it.targets)):
            R = len(r)
            ids.append(r)
            pos.append(torch.arange(P, P + R))
            seg[n, start:start + R] = k + 1
            # logits at P-1 predict the response's first token, at start+j its token j+1
            keep[n, k, :] = offset + P - 1  # unused slots (label IGNORE) point at a live position
            keep[n, k, 0] = offset + P - 1
            keep[n, k, 1:R + 1] = offset + torch.arange(start, start + R)
            labels[n, k, 1:R + 1] = tgt
            weights[n, k, 1:R + 1] = _weights(it, k)
            start += R
        gather[n, :L] = offset + torch.arange(L)
        scatter.append(n * T + torch.arange(L))
        offset += L
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    q, kv = seg[:, :, None], seg[:, None, :]
    mask = causal & (kv >= 0) & ((kv == 0) | (kv == q))
    mask |= torch.eye(T, dtype=torch.bool) & (q < 0)  # padding slots see themselves: no empty rows
    positions = torch.cat(pos)[gather]  # (N, T) each slot's position id (padding: any), for sliding windows
    layout = {"gather": gather.view(-1), "scatter": torch.cat(scatter), "mask": mask[:, None], "positions": positions,
              **live_queries(items, lengths, gather, mask, positions)}
    vision = collate_vision([it.vision for it in items], arch_name, lengths)
    rope = mrope_inputs(items, lengths, vision) if arch_name in MROPE_ARCHS else None
    return PrefixBatch(torch.cat(ids)[None], torch.cat(pos)[None], layout, keep.view(1, -1),
                       labels.view(N * K, -1), weights.view(N * K, -1), vision, N, K, [it.index for it in items], rope)


def mrope_inputs(items: list[GroupItem], lengths: list[int], vision: dict) -> dict:
    """What the model's get_rope_index needs for each item's prompt alone, right-padded (N, P): input_ids,
    mm_token_type_ids (taken out of `vision`: the packed row's positions are built from these), attention_mask and
    the images' grids; and where the results go in the packed row: prompt_rows (sum P,) the prompts' packed
    positions, prompt_src (sum P,) their index into (N*P), token_item (S,) each packed token's item. A response
    token's positions are its 1D position plus its item's M-RoPE offset, as in a plain forward."""
    types = vision.pop("mm_token_type_ids", None)
    P = torch.tensor([len(it.prompt_ids) for it in items])
    N, Pmax = len(items), int(P.max())
    valid = torch.arange(Pmax)[None] < P[:, None]
    ids = torch.zeros((N, Pmax), dtype=torch.long)
    ids[valid] = torch.cat([it.prompt_ids for it in items])
    kinds = torch.zeros((N, Pmax), dtype=torch.long) if types is None else types[:, :Pmax].long() * valid
    starts = torch.cumsum(torch.tensor(lengths), 0) - torch.tensor(lengths)  # each item's first packed position
    out = {"input_ids": ids, "mm_token_type_ids": kinds, "attention_mask": valid.long(),
           "prompt_rows": (starts[:, None] + torch.arange(Pmax))[valid],
           "prompt_src": (torch.arange(N)[:, None] * Pmax + torch.arange(Pmax))[valid],
           "token_item": torch.repeat_interleave(torch.arange(N), torch.tensor(lengths))}
    if "image_grid_thw" in vision:
        out["image_grid_thw"] = vision["image_grid_thw"]
    return out


def live_queries(items: list[GroupItem], lengths: list[int], gather: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> dict:
    """The live positions of a packed batch: each item's last prompt token and its responses, the only positions
    whose logits are taken (training.dpo.last_layer runs the last layer there alone). live_rows (S_live,): their
    packed positions, item after item; per item, its live slots side by side, (N, Q) with Q the most of any item:
    live_gather (N*Q,) index into live_rows (an item's spare slots repeat its last), live_mask (N, 1, Q, T) their
    rows of the items' masks, live_positions (N, Q) their position ids; live_scatter (S_live,) index into the
    N*Q slots, back to live_rows' order."""
    first = torch.tensor([len(it.prompt_ids) - 1 for it in items])  # the slot predicting the first response token
    counts = torch.tensor(lengths) - first
    N, Q = len(items), int(counts.max())
    j = torch.arange(Q)
    slots = torch.minimum(first[:, None] + j, first[:, None] + counts[:, None] - 1)  # (N, Q) item slots
    starts = torch.cumsum(counts, 0) - counts  # where each item's live rows begin in live_rows
    real = j < counts[:, None]
    return {"live_rows": gather.view(N, -1).gather(1, slots)[real],
            "live_gather": (starts[:, None] + torch.minimum(j, counts[:, None] - 1)).view(-1),
            "live_scatter": (torch.arange(N)[:, None] * Q + j)[real],
            "live_mask": mask[torch.arange(N)[:, None], slots][:, None],
            "live_positions": positions.gather(1, slots)}


@dataclass
class PlainBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    vision: dict
    n_items: int
    n_responses: int
    indices: list[int]

    def to(self, device) -> "PlainBatch":
        return PlainBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          self.weights.to(device), {k: v.to(device) for k, v in self.vision.items()},
                          self.n_items, self.n_responses, self.indices)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False,
                **self.vision}


def collate_plain(items: list[GroupItem], pad_id: int, arch_name: str) -> PlainBatch:
    """K full sequences per item; an item with fewer than K responses gets empty (all-IGNORE) rows."""
    N, K = len(items), max(len(it.responses) for it in items)
    T = max(len(it.prompt_ids) + len(r) for it in items for r in it.responses)
    ids = torch.full((N * K, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N * K, T), dtype=torch.long)
    labels = torch.full((N * K, T), IGNORE, dtype=torch.long)
    weights = torch.zeros((N * K, T))
    vis, lengths = [], []
    for n, it in enumerate(items):
        P = len(it.prompt_ids)
        for k in range(K):
            row = n * K + k
            r = it.responses[min(k, len(it.responses) - 1)]
            ids[row, :P], ids[row, P:P + len(r)], mask[row, :P + len(r)] = it.prompt_ids, r, 1
            if k < len(it.responses):
                labels[row, P:P + len(r)] = it.targets[k]
                weights[row, P:P + len(r)] = _weights(it, k)
            vis.append(it.vision)
            lengths.append(P + len(r))
    # token-aligned vision (mllama's cross-attention mask, Qwen2-VL's mm_token_type_ids) was encoded with the
    # first response: collate_vision cuts / extends it to each row's length
    return PlainBatch(ids, mask, labels, weights, collate_vision(vis, arch_name, lengths), N, K,
                      [it.index for it in items])


def collate_groups(items: list[GroupItem], pad_id: int, arch_name: str, fast: bool):
    if fast and arch_name in PREFIX_ARCHS:
        return collate_prefix(items, pad_id, arch_name)
    return collate_plain(items, pad_id, arch_name)
