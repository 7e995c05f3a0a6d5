"""Reward-model inputs: ranked lists -> encoded candidates -> one flat batch; and scoring.

    RankedBatch.seqs   SFTBatch (S, T): every candidate of every list, list by list, best first,
                       right-padded (the reward is read at each row's last non-pad token)
    RankedBatch.sizes  (B,) candidates per list (2 for a chosen/rejected pair)
    RankedBatch.packed fast path (families of training.dpo.data.PREFIX_ARCHS): instead of seqs, every list in
                       one packed row, [shared prefix | candidate 1's rest | ...] (training.dpo.data.collate_prefix:
                       the image and the tokens all candidates share computed once); read_at (S,) the packed
                       position of each candidate's last token, where its reward is read

`RewardScorer` is the one place a reward model's input is built at scoring time (held-out
evaluation, best-of-n, PPO rewards), with the same `rm_messages` as at training time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.data.bad_rows import alike_reason, cut_alike
from training.data.collate import SFTBatch, collate_sft
from training.data.images import load_image
from training.dpo.data import PREFIX_ARCHS, GroupItem, PrefixBatch, collate_prefix
from training.rm.factual import MissingFacts, has_facts, rm_messages, with_facts
from training.templates.chat import ChatEncoder, Encoded, PromptTooLong, RowNotEncodable


def encode_for_rm(encoder: ChatEncoder, prompt, response: str, images: list, facts=None, factual: bool = False,
                  shuffle_seed=None, whole: bool = False) -> Encoded:
    """One candidate. Factual mode: the factual block comes last, so any truncation loses it: error. whole
    (scoring): a response cut short is an error too."""
    too_long = PromptTooLong(f"image, prompt, response{' and factual block' if factual else ''} exceed "
                             f"max_seq_len={encoder.max_seq_len}")
    try:  # factual: the whole input is one prompt to the encoder, whose own message would call it a prompt
        enc = encoder.encode(rm_messages(prompt, response, facts, factual, shuffle_seed), images,
                             add_generation_prompt=factual, end_at_last_target=not factual)
    except PromptTooLong:
        if factual:
            raise too_long from None
        raise
    if (factual or whole) and enc.truncated:
        raise too_long
    return enc


def readable_response(text: str, encoder: ChatEncoder) -> str:
    """A generated response as a reward model reads it (PPO, best-of-n): without the text of a special token, which
    a policy can spell from ordinary tokens (the special token's own id is removed from the decoded text or never
    sampled) and the encoder would take for the token itself: "<image>" for another image, "</s>" or "<|im_end|>"
    for an end of turn inside the answer. Training data with a placeholder is a bad row instead
    (training.data.row_parts). Both image spellings go: the architecture's token (Qwen2-VL's "<|image_pad|>") and the
    messages' "<image>", which the template layer turns into an image of any architecture."""
    marks = encoder.spelled_marks  # (kept by the encoder: this runs for every sampled response)
    while any(t in text for t in marks):  # one pass could join a new one ("<ima<image>ge>")
        for t in marks:
            text = text.replace(t, "")
    return text


@dataclass
class RankedBatch:
    seqs: SFTBatch | None  # None on the fast path (packed)
    sizes: list[int]
    margins: list[float | None] | None = None  # per list: its row's margin column (None: none given)
    lengths: torch.Tensor | None = None  # (S,) each response's tokens (ODIN's training)
    packed: PrefixBatch | None = None
    read_at: torch.Tensor | None = None  # (S,) with packed
    n_tokens: int = 0  # every candidate's whole length, summed (the plain layout's tokens, either way)

    def to(self, device) -> "RankedBatch":
        def move(x):
            return None if x is None else x.to(device)
        return RankedBatch(move(self.seqs), self.sizes, self.margins, move(self.lengths), move(self.packed),
                           move(self.read_at), self.n_tokens)

    def model_inputs(self) -> dict:
        """The reward model's forward arguments: the padded rows, or the packed row and where to read it."""
        return self.seqs.model_inputs() if self.packed is None else {"packed": self.packed, "read_at": self.read_at}

    def as_matrix(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) rewards -> (B, N) rewards and (B, N) bool mask, N = longest list; padding holds 0."""
        B, N = len(self.sizes), max(self.sizes)
        out = rewards.new_zeros((B, N))
        mask = torch.zeros((B, N), dtype=torch.bool, device=rewards.device)
        start = 0
        for b, n in enumerate(self.sizes):
            out[b, :n], mask[b, :n] = rewards[start:start + n], True
            start += n
        return out, mask


def collate_ranked(items: list[list[Encoded]], pad_id: int, arch_name: str, margins=None,
                   lengths: list[list[int]] | None = None, fast: bool = False) -> RankedBatch:
    flat = [e for cands in items for e in cands]
    flat_lengths = None if lengths is None else torch.tensor([n for ns in lengths for n in ns], dtype=torch.float32)
    sizes, n_tokens = [len(c) for c in items], sum(len(e.input_ids) for e in flat)
    if fast and arch_name in PREFIX_ARCHS:
        packed, read_at = pack_lists(items, pad_id, arch_name)
        return RankedBatch(None, sizes, margins, flat_lengths, packed, read_at, n_tokens)
    return RankedBatch(collate_sft(flat, pad_id, arch_name), sizes, margins, flat_lengths, n_tokens=n_tokens)


def _shared(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two id sequences share."""
    n = min(len(a), len(b))
    first = (a[:n] != b[:n]).nonzero()
    return int(first[0]) if len(first) else n


def pack_lists(items: list[list[Encoded]], pad_id: int, arch_name: str) -> tuple[PrefixBatch, torch.Tensor]:
    """Each list as a GroupItem: the token ids all its candidates share (image and prompt, and in factual mode the
    start of the block that holds the response), then each candidate's rest (at least its last token); packed by
    training.dpo.data.collate_prefix. Returns the batch and each candidate's last packed position."""
    groups = []
    for i, cands in enumerate(items):
        ids = [e.input_ids for e in cands]
        P = min([min(len(x) for x in ids) - 1] + [_shared(ids[0], x) for x in ids[1:]])
        rest = [x[P:] for x in ids]
        groups.append(GroupItem(i, ids[0][:P], cands[0].vision, rest, rest, [None] * len(rest)))
    packed = collate_prefix(groups, pad_id, arch_name)
    keep = packed.keep.view(len(groups), packed.n_responses, -1)
    read_at = torch.stack([keep[n, k, len(r)] for n, g in enumerate(groups) for k, r in enumerate(g.responses)])
    return packed, read_at


class RMDataset(torch.utils.data.Dataset):
    """PreferenceRecords -> per record the encoded candidates (lazily: images decoded per batch).

    Factual mode: records without facts are reported up front (clear error, or a counted skip);
    facts are shuffled per (seed, epoch, record) when `shuffle_facts` (training), in the given
    order otherwise (evaluation). Set `epoch` before each epoch."""

    def __init__(self, records, encoder: ChatEncoder, image_root: str, report, factual: bool,
                 shuffle_facts: bool = False, seed: int = 0):
        if factual:
            records = with_facts(records, report)
        self.records, self.encoder, self.image_root, self.report = records, encoder, image_root, report
        self.factual, self.shuffle_facts, self.seed, self.epoch = factual, shuffle_facts, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i) -> list[Encoded] | None:
        r = self.records[i]
        images = [load_image(src, self.image_root) for src in r.images]
        seed = f"{self.seed}-{self.epoch}-{r.id}" if self.shuffle_facts else None
        try:
            encs = [encode_for_rm(self.encoder, r.prompt, resp, images, r.facts, self.factual, seed)
                    for resp in r.responses]
        except RowNotEncodable as e:
            self.report.bad(r.source, r.text_field, str(e), item=(self, i))
            return None
        truncated = any(e.truncated for e in encs)
        if cut_alike(r.responses, [e.input_ids for e in encs]):
            self.report.bad(r.source, r.text_field, alike_reason(truncated, self.encoder.max_seq_len), item=(self, i))
            return None
        if truncated:
            self.report.truncated(r.source, (self, i))
        return encs


class RewardScorer:
    """Scores responses with a reward model (a RewardModel, or a DeepSpeed engine wrapping one).

    Factual reward models get the factual block whenever facts are given; without facts they score
    the plain conversation (and `warn_missing_facts` says so once)."""

    def __init__(self, model, processor, arch, max_seq_len: int = 2048, batch_size: int = 16, device=None,
                 chat_template: str | None = None, factual: bool | None = None, skip_unfit: bool = False):
        self.model, self.processor, self.arch = model, processor, arch
        self.encoder = ChatEncoder(processor, arch, max_seq_len, chat_template)
        self.batch_size, self.device, self.skip_unfit = batch_size, device, skip_unfit
        inner = getattr(model, "module", model)
        self.factual = bool(getattr(inner, "factual", False)) if factual is None else factual

    @torch.no_grad()
    def score(self, prompts: list, images: list[list], responses: list[str], facts: list | None = None) -> torch.Tensor:
        """(n,) float32 rewards on CPU. prompts: message lists; images: PIL lists; facts: lists or None.
        A response the reward model cannot read whole within max_seq_len with its image, prompt and (factual) facts
        raises PromptTooLong (a reward read at a cut response judges another answer), or with `skip_unfit` is not
        scored: its reward is NaN, for the caller to report."""
        use_facts = self.factual and facts is not None
        if use_facts and not all(has_facts(f) for f in facts):
            raise MissingFacts("factual reward model: some samples have facts and some have none")
        enc, kept = [], []
        for i, (p, im, r) in enumerate(zip(prompts, images, responses)):
            try:
                enc.append(encode_for_rm(self.encoder, p, readable_response(r, self.encoder), im,
                                         facts[i] if use_facts else None, use_facts, whole=True))
                kept.append(i)
            except PromptTooLong:
                if not self.skip_unfit:
                    raise
        pad = self.processor.tokenizer.pad_token_id
        out = torch.full((len(responses),), float("nan"))
        for k in range(0, len(enc), self.batch_size):
            b = collate_sft(enc[k:k + self.batch_size], pad, self.arch.name)
            if self.device is not None:
                b = b.to(self.device)
            out[kept[k:k + self.batch_size]] = self.model(**b.model_inputs()).float().cpu()
        return out

    def score_records(self, records, image_root: str, responses: list[str]) -> torch.Tensor:
        images = [[load_image(s, image_root) for s in r.images] for r in records]
        facts = [r.facts for r in records] if all(has_facts(r.facts) for r in records) else None
        return self.score([r.prompt for r in records], images, responses, facts)


def missing_facts_note(records, factual: bool) -> str:
    """Empty, or a one-line note when a factual reward model scores rows without facts."""
    if factual and not all(has_facts(r.facts) for r in records):
        return ("note: the reward model is factual but these questions carry no 'facts': scoring without "
                "the factual block (--captions_file gives LLaVA-RLHF questions their captions)")
    return ""
