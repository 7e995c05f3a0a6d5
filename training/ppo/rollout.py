"""Rollouts: batched, KV-cached generation of responses, laid out for scoring and training.

A rollout batch is right-padded `prompt + response` rows (an SFTBatch whose labels are the
response tokens, EOS included), so the actor, reference and critic forwards and the shared
log-prob code treat it exactly like SFT data. Under ZeRO-3 the trainer gathers the whole actor on
each rank for generation (Strategy.whole_for_generation); with --no-gather_for_generation and several
ranks, generation runs with `synced_gpus=True`: a rank that finished keeps joining the per-module
parameter all-gathers until every rank is done, which is what makes other frameworks hang at step 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from training.data.collate import SFTBatch, collate_sft
from training.predict.generate import DecodeArgs, sampling_as_asked, stop_and_never
from training.templates.chat import IGNORE, PER_SAMPLE_VISION, TOKEN_ALIGNED, ChatEncoder, Encoded, PromptTooLong


@dataclass
class Rollout:
    batch: SFTBatch  # (B, T) right-padded prompt + response; labels on response tokens
    responses: list[str]  # decoded response text (special tokens removed)
    lengths: torch.Tensor  # (B,) response tokens incl. EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS within max_new_tokens
    gen_seconds: float  # this rank's generation time
    suppressed: list[int]  # token ids the sampler never draws: the trainer's log-probs leave them out too
    vision_rows: dict | None = None  # vision key -> rows of batch.vision[key] each rollout holds (vision_rows)
    with_vision: list[bool] | None = None  # whether each rollout's prompt has vision inputs (images)


def vision_rows(rows: list[Encoded], arch_name: str) -> dict[str, list[int]]:
    """How many rows of each collated vision input belong to each sample, in order: one per sample for inputs
    collated one row per sample (token-aligned ones, PER_SAMPLE_VISION archs), else the sample's own rows (its
    images, or Qwen2-VL's patches; none for a text-only prompt)."""
    keys = dict.fromkeys(k for e in rows for k in (e.vision or {}))
    return {k: [1] * len(rows) if k in TOKEN_ALIGNED or arch_name in PER_SAMPLE_VISION
            else [int(e.vision[k].shape[0]) if e.vision and k in e.vision else 0 for e in rows] for k in keys}


def generate_rollouts(model, processor, encoder: ChatEncoder, arch_name: str, prompts: list, images: list,
                      decode: DecodeArgs, device, synced_gpus: bool = False) -> Rollout:
    tok = processor.tokenizer
    eos_list, never = stop_and_never(model, tok, encoder.end_of_turn_id)
    eos_ids = set(eos_list)
    enc = [encoder.encode(p, im, add_generation_prompt=True) for p, im in zip(prompts, images)]
    left = collate_sft(enc, tok.pad_token_id, arch_name, left_pad=True).to(device)
    t0 = time.time()
    with torch.no_grad(), sampling_as_asked(model, decode.do_sample):
        # top_k=0: from the whole softmax / temperature, the distribution the trainer's log-probs are of
        # (transformers' default top_k of 50 sampled from a truncated one, so ratios and KL were off-policy;
        # and nothing a checkpoint's generation config sets, e.g. a repetition penalty)
        out = model.generate(**left.model_inputs(), do_sample=decode.do_sample, temperature=decode.temperature,
                             top_p=decode.top_p, top_k=0, max_new_tokens=decode.max_new_tokens,
                             synced_gpus=synced_gpus, pad_token_id=tok.pad_token_id, eos_token_id=eos_list,
                             use_cache=True, suppress_tokens=never)
    dt = time.time() - t0
    new = out[:, left.input_ids.shape[1]:].cpu()
    rows, lengths, ended = [], [], []
    for e, gen in zip(enc, new.tolist()):
        cut = next((i + 1 for i, t in enumerate(gen) if t in eos_ids), None)
        resp = gen[:cut] if cut else gen
        ended.append(cut is not None)
        lengths.append(len(resp))
        ids = torch.cat([e.input_ids, torch.tensor(resp, dtype=torch.long)])
        labels = torch.cat([torch.full_like(e.input_ids, IGNORE), torch.tensor(resp, dtype=torch.long)])
        rows.append(Encoded(ids, labels, e.vision, prompt_len=len(e.input_ids)))
    batch = collate_sft(rows, tok.pad_token_id, arch_name).to(device)
    texts = tok.batch_decode([r.input_ids[r.prompt_len:] for r in rows], skip_special_tokens=True)
    return Rollout(batch, [t.strip() for t in texts], torch.tensor(lengths), torch.tensor(ended), dt, never,
                   vision_rows(rows, arch_name), [bool(e.vision) for e in rows])


@dataclass
class Relaid:
    """A rollout batch's responses after other prompts (Rollout's fields of the same names)."""
    batch: SFTBatch
    vision_rows: dict | None
    with_vision: list[bool]


def relay(ro: Rollout, encoder: ChatEncoder, arch_name: str, prompts: list, images: list, pad_id: int,
          device, names: list | None = None) -> Relaid:
    """Each rollout's response tokens (EOS included), the very ids sampled, after prompts[i] encoded for generation
    (another reader's view of the same rollout: the asymmetric critic's prompt with facts). Labels mark the response
    tokens, as in the rollout batch, so response_view aligns the two. A prompt too long for the encoder raises
    PromptTooLong naming names[i] (its row)."""
    labels = ro.batch.labels.cpu()
    rows = []
    for i, (p, im) in enumerate(zip(prompts, images)):
        resp = labels[i][labels[i] != IGNORE]
        try:
            e = encoder.encode(p, im, add_generation_prompt=True)
        except PromptTooLong as err:
            raise PromptTooLong(f"{names[i]}: {err}" if names else str(err)) from None
        rows.append(Encoded(torch.cat([e.input_ids, resp]), torch.cat([torch.full_like(e.input_ids, IGNORE), resp]),
                            e.vision, prompt_len=len(e.input_ids)))
    return Relaid(collate_sft(rows, pad_id, arch_name).to(device), vision_rows(rows, arch_name),
                  [bool(e.vision) for e in rows])


def response_view(x: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each row's contiguous response positions of a shifted (B, T-1) tensor into (B, R)."""
    start = mask.long().argmax(-1)  # (B,) first response position
    n = mask.sum(-1)
    idx = (start[:, None] + torch.arange(length, device=x.device)[None]).clamp(max=x.shape[1] - 1)
    rmask = torch.arange(length, device=x.device)[None] < n[:, None]
    return x.gather(1, idx) * rmask, rmask
