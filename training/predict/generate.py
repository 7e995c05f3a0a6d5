"""Batched generation for prompts with images (left-padded, KV-cached, greedy / sampling / beams)."""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch

from training.data.collate import collate_sft
from training.templates.chat import ChatEncoder


@dataclass
class DecodeArgs:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1


def stop_and_never(model, tokenizer, end_of_turn: int | None = None) -> tuple[list[int], list[int]]:
    """(EOS ids that end a response, token ids a response must never hold: image / video placeholders
    (a sampled one breaks the next forward: placeholder count != image features) and padding unless
    it doubles as EOS). Every generate call of the project passes both. end_of_turn: the chat template's
    end-of-turn token (`ChatEncoder.end_of_turn_id`), which trained answers end with: a stop token too."""
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if end_of_turn is not None and end_of_turn not in eos_ids:
        eos_ids.append(end_of_turn)
    cfg = model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    ids = {getattr(cfg, n, None) for n in names} | {getattr(tokenizer, "image_token_id", None), tokenizer.pad_token_id}
    return eos_ids, sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer) and i not in set(eos_ids))


@contextlib.contextmanager
def sampling_as_asked(model, do_sample: bool):
    """Sampling draws from softmax(logits / temperature), cut by top_p, and from nothing else: generate would
    apply whatever a checkpoint's generation_config.json sets (Qwen2-VL's: top_k 1, so every sample was its
    greedy answer; others: a repetition penalty, min_p, ...) and transformers' own top_k of 50 where it sets
    none. While sampling, the model's generation config is one holding only its token ids (callers pass top_k=0);
    greedy decoding and beams keep the checkpoint's."""
    if not do_sample:
        yield
        return
    from transformers import GenerationConfig
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: generate is the base's
    old = target.generation_config
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    target.generation_config = GenerationConfig(**{k: v for k in ids if (v := getattr(old, k, None)) is not None})
    try:
        yield
    finally:
        target.generation_config = old


def sample_seed(*parts: int) -> int:
    """A seed for one row's own generator from what names its samples (e.g. --seed, the question's place in its
    file, which sample of best-of-N): mixed by hash, so nearby seeds or places do not share draws."""
    digest = hashlib.sha256(":".join(str(int(x)) for x in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowSampler:
    """A logits processor, generate's last, that draws each row's next token itself (inverse CDF, from a CPU
    generator of the row's own seed: the same draws on every device) from softmax(logits / temperature) cut by
    top_p, applied by transformers' own warpers as generate applies them, and leaves only that token possible:
    generate's multinomial then picks it. A row's samples so depend on its seed alone, not on the rows batched
    with it (each row draws one number a step; a finished row's draws are unused). generate is called with
    temperature 1 and top_p 1 then, so that no warper follows this one."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler: {scores.shape[0]} rows to sample, {len(self.generators)} seeds")
        scores = self.warpers(input_ids, scores)
        u = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in self.generators])
        cdf = scores.double().softmax(-1).cumsum(-1)  # u * total < total: the token found has a probability > 0
        token = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, token.clamp(max=scores.shape[1] - 1), 0.0)


def encode_prompts(encoder: ChatEncoder, prompts: list, images: list) -> list:
    """Prompts to answer, encoded; one that does not fit max_seq_len raises PromptTooLong."""
    return [encoder.encode(p, im, add_generation_prompt=True) for p, im in zip(prompts, images)]


def generate_batch(model, processor, encoder: ChatEncoder, arch_name: str, prompts: list, images: list,
                   decode: DecodeArgs, device=None, encoded: list | None = None,
                   seeds: list[int] | None = None) -> list[list[str]]:
    """prompts: list of message lists; images: list of PIL lists; encoded: the prompts already encoded
    (`encode_prompts`), or None to encode them here; seeds: one a prompt, for sampling without beams: its k-th
    sample is drawn by a `RowSampler` seeded with sample_seed(seed, k), whatever else is in the batch (None: from
    torch's global generator, as the batch falls). Returns n texts per prompt."""
    tok = processor.tokenizer
    enc = encoded if encoded is not None else encode_prompts(encoder, prompts, images)
    batch = collate_sft(enc, tok.pad_token_id, arch_name, left_pad=True)
    if device is not None:
        batch = batch.to(device)
    eos_ids, never = stop_and_never(model, tok, encoder.end_of_turn_id)
    kw = dict(max_new_tokens=decode.max_new_tokens, do_sample=decode.do_sample, num_beams=decode.num_beams,
              num_return_sequences=decode.num_return_sequences, pad_token_id=tok.pad_token_id,
              eos_token_id=eos_ids, suppress_tokens=never)
    if decode.do_sample:
        kw.update(temperature=decode.temperature, top_p=decode.top_p, top_k=0)
    n = decode.num_return_sequences
    if decode.do_sample and decode.num_beams == 1 and seeds is not None:
        from transformers import LogitsProcessorList
        rows = [sample_seed(s, k) for s in seeds for k in range(n)]  # generate's rows: each prompt's n, in turn
        kw.update(temperature=1.0, top_p=1.0, logits_processor=LogitsProcessorList(
            [RowSampler(rows, decode.temperature, decode.top_p)]))
    with torch.no_grad(), sampling_as_asked(model, decode.do_sample):
        out = model.generate(**batch.model_inputs(), **kw)
    new = out[:, batch.input_ids.shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(prompts))]


def best_of_n(model, processor, encoder: ChatEncoder, arch_name: str, prompts: list, images: list,
              decode: DecodeArgs, n: int, scorer, facts: list | None = None, device=None, encoded: list | None = None,
              seeds: list[int] | None = None):
    """Best-of-n (Vision-LLM-Alignment's "BoS"): sample n answers per prompt in one batched
    generate call, score all of them with `scorer` (a `training.rm.data.RewardScorer`, given the
    facts when its reward model is factual and every prompt has them) and keep the highest; `encoded` and `seeds`
    as in `generate_batch`. An answer the scorer did not score (reward NaN) is kept only when none was scored.
    -> (best texts, their rewards (B,), all rewards (B, n))."""
    import dataclasses
    decode = dataclasses.replace(decode, do_sample=True, num_beams=1, num_return_sequences=n)
    cands = generate_batch(model, processor, encoder, arch_name, prompts, images, decode, device, encoded, seeds)
    flat = [t for c in cands for t in c]
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731  each prompt's row, n times
    rewards = scorer.score(rep(prompts), rep(images), flat, rep(facts) if facts is not None else None).view(-1, n)
    best = rewards.nan_to_num(float("-inf")).argmax(-1)
    return [c[int(k)] for c, k in zip(cands, best)], rewards.gather(1, best[:, None]).squeeze(1), rewards
