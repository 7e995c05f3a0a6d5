"""The one chat-template layer: conversation + images -> input_ids, labels and pixel inputs.

The rendered text comes from the processor's own chat template (or an explicit override). Each
assistant turn is located by rendering the conversation up to that turn with and without it (for a
template whose earlier turns depend on later ones, that turn's text is then found in the whole
rendering; see `ChatEncoder.segments`), so labels cover exactly the assistant
text and its end-of-turn token, on every turn; everything else is -100. A template that closes an
answer with no end token at all (llava-hf's LLaVA-1.5 template writes the text and a space) gets the
tokenizer's EOS appended to each answer, as LLaVA trained it: a model that never sees an end token
never learns to stop.

Segments are tokenised one by one: a prompt segment that holds images goes through the processor (which
expands the image placeholders exactly as the model expects and returns pixel inputs); other segments go
through the tokenizer. A later segment is tokenised after the text before it, back to that text's last special
token (written as the EOS), and that context's tokens are dropped: a tokenizer that puts a prefix space in
front of what it is given (SentencePiece's "▁" in Llama and Mistral tokenizers) would otherwise give each
segment tokens the whole conversation does not have. Truncation drops tokens from the end but never cuts an
image's tokens: a later turn whose images would be cut is dropped whole, with its images, and a sample whose
first prompt (with its images) does not fit raises `PromptTooLong`, as does a prompt to answer (generation: no
targets) that does not fit whole.

Whitespace a template writes AFTER an assistant turn's end-of-turn token (ChatML's "<|im_end|>\n",
Idefics3's "<end_of_utterance>\n") is the separator before the next turn: generation stops at the
end-of-turn token, so that whitespace is not a target and goes with the following prompt text.

Pixel inputs are of two kinds. Most are per image (pixel_values, image_sizes, image_grid_thw...) and
are concatenated over the sample's images. A few are aligned with the TOKENS, shape (1, T, ...):
Qwen2-VL's `mm_token_type_ids` (1 on image tokens, needed for M-RoPE) and mllama's
`cross_attention_mask` (which images each token attends to). Those are rebuilt for the whole
sample (see `merge_vision`) and padded like input_ids by the collator.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import jinja2
import torch
import torch.nn.functional as F

from training.data.records import IMAGE_PLACEHOLDER, Message

IGNORE = -100
# EOS tokens that a published chat template writes as other text after each answer (see `segments`)
MISSPELT_EOS = {"</s>": "<\\s>"}
# Architectures whose processors return pixel inputs with a per-SAMPLE leading dimension
# (images stacked on dim 1) rather than one row per image.
PER_SAMPLE_VISION = {"idefics3", "mllama"}
# Pixel-input keys aligned with the tokens, shape (1, T, ...) per sample (see the module docstring).
TOKEN_ALIGNED = ("mm_token_type_ids", "cross_attention_mask")
# Renderings kept by a ChatEncoder: locating the answers renders the prompt once per response and the whole
# conversation twice; a pair's prompt and its responses are encoded one after another.
RENDERS_KEPT = 64


# the date Llama 3.x chat templates fall back to without strftime_now: every render the same tokens
TEMPLATE_DATE = "26 Jul 2024"


class RowNotEncodable(ValueError):
    """A conversation this encoder cannot turn into tokens: a bad row of the data, not a failed run."""


class PromptTooLong(RowNotEncodable):
    """The prompt (with its image tokens) leaves no room for a response within max_seq_len."""


class TemplateNotPrefixStable(RowNotEncodable):
    """The chat template renders an assistant turn of this conversation differently alone and in the whole
    conversation, so the answer cannot be located. (Llama 3.2 Vision's official template writes a system block
    only when no message holds an image, so a conversation whose first image comes in a later turn renders its
    first turns one way alone and another way whole; its answers are the same text in both and are found.)"""


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE outside assistant tokens
    vision: dict = field(default_factory=dict)  # processor pixel inputs for this sample
    prompt_len: int = 0  # tokens before the LAST assistant turn (the response of a preference pair)
    truncated: bool = False


def to_hf_messages(messages: list[Message], system_as_text: bool = False) -> list[dict]:
    """Our messages ("<image>" in text) -> HF content parts [{"type": "image"}, {"type": "text"}].
    system_as_text: a system message's content as a plain string, for templates that print it as one."""
    out = []
    for m in messages:
        if system_as_text and m.role == "system" and IMAGE_PLACEHOLDER not in m.content:
            out.append({"role": "system", "content": m.content})
            continue
        pieces = m.content.split(IMAGE_PLACEHOLDER)
        parts = []
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            piece = piece.strip("\n") if len(pieces) > 1 else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m.role, "content": parts})
    return out


class ChatEncoder:
    def __init__(self, processor, arch, max_seq_len: int, chat_template: str | None = None):
        self.processor, self.arch, self.max_seq_len = processor, arch, max_seq_len
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template
        if not chat_template and not getattr(processor, "chat_template", None):
            raise SystemExit(f"the {type(processor).__name__} of this model has no chat template: give one with "
                             "--template FILE (training stages; a Jinja chat template, e.g. the one of the model it "
                             "was tuned from), or save it with the model as chat_template.jinja")
        self.image_token = arch.image_token
        self._rendered: dict[tuple, str] = {}
        self._contexts: dict[str, list[int]] = {}

    # ---- text ----------------------------------------------------------------------------
    @functools.cached_property
    def end_of_turn_id(self) -> int | None:
        """The special token that ends an assistant turn in the targets (Idefics3's <end_of_utterance>, ChatML's
        <|im_end|>, Llama 3's <|eot_id|>, else the EOS appended): generation must stop at it, whatever EOS the
        checkpoint's generation config names (Idefics3-8B's names <|end_of_text|> only)."""
        try:
            target = next(t for t, is_target in self.segments([Message("user", "Hi"), Message("assistant", "Yes")])
                          if is_target)
        except (RowNotEncodable, StopIteration):  # a template that cannot render a plain exchange: EOS only
            return None
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        special = {self.tokenizer.convert_tokens_to_ids(t) for t in self._special_tokens}
        return ids[-1] if ids and ids[-1] in special else None

    @functools.cached_property
    def _special_tokens(self) -> set[str]:
        """The tokens an answer can end with as its end token: those the tokenizer names (BOS, EOS, pad, extras) and
        its added tokens (a Llama 3 base tokenizer names BOS and EOS only: its <|eot_id|> is an added token)."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        return {t for t in getattr(self.tokenizer, "all_special_tokens", []) if t} | {a.content for a in added.values()}

    @functools.cached_property
    def spelled_marks(self) -> list[str]:
        """The texts a generated answer must not hold when it is encoded again (the special tokens, the image
        placeholders of the messages and of the architecture), longest first: see training.rm.data.readable_response."""
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_tokens", None) or ()) | {
            a.content for a in (getattr(tok, "added_tokens_decoder", None) or {}).values() if a.special}
        return sorted({t for t in (IMAGE_PLACEHOLDER, self.image_token, *special) if t}, key=len, reverse=True)

    @functools.cached_property
    def _system_as_text(self) -> bool:
        """Whether the template prints a system message's content as a string (Llama 3.2 Vision's official one
        writes `messages[0]['content']|trim`: given content parts it trained on their Python repr)."""
        try:
            probe = self._render_hf([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], False)
        except Exception:  # noqa: BLE001 - a template without system turns: rendering them fails as it would
            return False
        return "'type'" in probe or '"type"' in probe

    def _render_hf(self, hf_messages: list[dict], add_generation_prompt: bool) -> str:
        kw = {"chat_template": self.chat_template} if self.chat_template else {}
        template = self.chat_template or getattr(self.processor, "chat_template", None)
        if isinstance(template, str) and "date_string" in template:  # (transformers warns of a variable not used)
            # Llama 3.x templates write "Today Date: <the day's date>" unless given one: the same conversation
            # would become other tokens from one day to the next (a reference cache, a resumed run)
            kw["date_string"] = TEMPLATE_DATE
        return self.processor.apply_chat_template(hf_messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        key = (tuple((m.role, m.content) for m in messages), add_generation_prompt)
        text = self._rendered.get(key)
        if text is None:
            if len(self._rendered) >= RENDERS_KEPT:
                self._rendered.clear()
            system_as_text = any(m.role == "system" for m in messages) and self._system_as_text
            try:
                text = self._render_hf(to_hf_messages(messages, system_as_text), add_generation_prompt)
            except (jinja2.TemplateSyntaxError, jinja2.UndefinedError):  # a broken template: not the row's fault
                raise
            except jinja2.TemplateError as err:  # the template's own raise_exception: e.g. Llama 3.2 Vision's
                raise RowNotEncodable(f"the chat template refuses this conversation: {err}") from None  # system + image
            self._rendered[key] = text
        return text

    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """[(text, is_target)]: the rendered conversation cut at assistant-turn boundaries. Each answer is what
        the template adds when the turn is appended to the conversation before it. A template whose rendering
        of the earlier turns depends on later ones (`TemplateNotPrefixStable`'s example) is cut where each
        answer, with the generation prompt before it, is found in the whole rendering, in turn order."""
        try:
            return self._segments_in_order(messages, add_generation_prompt)
        except TemplateNotPrefixStable:
            return self._segments_found_whole(messages, add_generation_prompt)

    def _answer(self, rendered: str) -> tuple[str, int]:
        """(the target, how many rendered characters it covers) of an assistant turn the template rendered as
        `rendered` (the text the turn adds after the generation prompt)."""
        core, eos = rendered.rstrip(), self.tokenizer.eos_token
        specials = self._special_tokens
        if eos and MISSPELT_EOS.get(eos) and core.endswith(MISSPELT_EOS[eos]):
            # llava-hf's LLaVA-NeXT-Mistral template writes the TEXT "<\s>" where the EOS "</s>" belongs:
            # trained as the answer's end, the model would learn to write it and never emit the EOS
            return core[:-len(MISSPELT_EOS[eos])] + eos, len(core)
        if core != rendered and any(core.endswith(t) for t in specials):
            return core, len(core)  # whitespace after the end-of-turn token: not a target (module docstring)
        if eos and not any(core.endswith(t) for t in specials):
            # a template that closes an answer with no end token (llava-hf's LLaVA-1.5 template writes
            # text + " "): the model would never learn to stop. The answer ends with EOS, as LLaVA
            # trained it; the whitespace after it stays outside the target. An empty answer (a PPO rollout
            # that stopped at once, scored by the reward model) is the EOS alone, as under a template that
            # writes the end token: it had no target and ended on the generation prompt
            return core + eos, len(core)
        return rendered, len(rendered)

    def _turn(self, messages: list[Message], i: int) -> tuple[str, str]:
        """(the conversation before assistant turn i with the generation prompt, the text turn i adds to it)."""
        before = self.render(messages[:i], add_generation_prompt=True)
        full = self.render(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(before):
            raise TemplateNotPrefixStable(
                f"the chat template renders assistant turn {i} without the generation prompt before it (not "
                "prefix-stable), so its answer cannot be located; pass --template with a template that renders "
                "turns in order")
        return before, full[len(before):]

    def _segments_in_order(self, messages: list[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        segs, prev, pos = [], "", 0  # prev: the rendering so far; pos: where the next segment starts
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before, rendered = self._turn(messages, i)
            if not before.startswith(prev):
                raise TemplateNotPrefixStable(
                    f"the chat template renders this conversation's turns up to assistant turn {i} differently "
                    "alone and whole (not prefix-stable), so its answers cannot be located; pass --template with a "
                    "template that renders turns in order")
            target, used = self._answer(rendered)
            segs += [(before[pos:], False), (target, True)]
            prev, pos = before + rendered, len(before) + used
        rest = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not rest.startswith(prev):
            raise TemplateNotPrefixStable(
                "the chat template renders this conversation differently from its turns (not prefix-stable); "
                "pass --template with a template that renders turns in order")
        if rest[pos:]:
            segs.append((rest[pos:], False))
        return [s for s in segs if s[0]]

    def _segments_found_whole(self, messages: list[Message], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        whole = self.render(messages, add_generation_prompt=add_generation_prompt)
        segs, pos = [], 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before, rendered = self._turn(messages, i)
            bare = self.render(messages[:i], add_generation_prompt=False)
            prompt = before[len(bare):] if before.startswith(bare) else ""  # the generation prompt's text
            at = whole.find(prompt + rendered, pos)
            if at < 0:
                raise TemplateNotPrefixStable(
                    f"the chat template renders this conversation's turns up to assistant turn {i} differently "
                    "alone and whole (not prefix-stable), and the whole rendering does not hold the turn's answer "
                    "as rendered alone, so it cannot be located; pass --template with a template that renders "
                    "turns in order")
            start = at + len(prompt)
            target, used = self._answer(rendered)
            segs += [(whole[pos:start], False), (target, True)]
            pos = start + used
        if whole[pos:]:
            segs.append((whole[pos:], False))
        return [s for s in segs if s[0]]

    # ---- tokens --------------------------------------------------------------------------
    @functools.cached_property
    def _section_starts(self) -> re.Pattern | None:
        """The tokens that start a new section for the tokenizer (its special and added tokens): the text after
        one is tokenised the same alone as within the whole conversation."""
        tokens = sorted(self._special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def _context(self, before: str) -> str:
        """What a segment following the text `before` continues, as the tokenizer sees it within the whole
        conversation: `before` from its last special token on (that token written as the EOS, which needs no
        image), else all of `before` (the conversation's first section)."""
        last = None
        for last in self._section_starts.finditer(before) if self._section_starts else ():
            pass
        anchor = self.tokenizer.eos_token
        if last is None or not anchor:
            return before
        return anchor + before[last.end():]

    def answer_context(self, messages: list[Message]) -> tuple[str, str, str] | None:
        """(context, lead, tail) of the last answer of `messages` as `encode` tokenises it: its segment, lead +
        content + tail, is tokenised after `context` (whose tokens are dropped; see `_context`); lead is the
        template's text before the message's content (the space after "ASSISTANT:"), tail its text after it (the end
        token). None where the segment does not hold the content (a template that rewrites it)."""
        segs = self.segments(messages)
        k = max((i for i, (_, target) in enumerate(segs) if target), default=None)
        at = -1 if k is None else segs[k][0].find(messages[-1].content)
        if at < 0:
            return None
        segment = segs[k][0]
        return ((self._context("".join(text for text, _ in segs[:k])) if k else ""), segment[:at],
                segment[at + len(messages[-1].content):])

    def text_tokens(self, text: str, context: str = "") -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character spans in `text`) of a text without images as `encode` tokenises it after `context` (see
        `_tokenize`), for a caller that needs where each token stands (a fast tokenizer's offsets)."""
        if context and self.image_token not in context:
            head = self._context_ids(context)
            enc = self.tokenizer(context + text, add_special_tokens=False, return_offsets_mapping=True)
            if enc["input_ids"][:len(head)] == head:
                n = len(context)
                return enc["input_ids"][len(head):], [(max(a - n, 0), max(b - n, 0))
                                                      for a, b in enc["offset_mapping"][len(head):]]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _tokenize(self, text: str, images: list, first: bool, context: str = "") -> tuple[list[int], dict]:
        """The tokens of `text` (and its pixel inputs) as they are in the whole conversation, where `context` is
        the text before it (see `_context`); the tokens of a context that a token of `text` would merge into
        cannot be dropped, and `text` is then tokenised alone."""
        if context and self.image_token not in context:
            head = self._context_ids(context)
            ids, vision = self._tokenize_alone(context + text, images, first=False)
            if ids[:len(head)] == head:
                return ids[len(head):], {k: v[:, len(head):] if k in TOKEN_ALIGNED else v for k, v in vision.items()}
        return self._tokenize_alone(text, images, first)

    def _context_ids(self, context: str) -> list[int]:
        """A context's tokens, kept (a prompt's tail recurs: "...ASSISTANT:" before every answer)."""
        ids = self._contexts.get(context)
        if ids is None:
            if len(self._contexts) >= RENDERS_KEPT:
                self._contexts.clear()
            ids = self._contexts[context] = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        return ids

    def _tokenize_alone(self, text: str, images: list, first: bool) -> tuple[list[int], dict]:
        bos = self.tokenizer.bos_token
        add_special = first and not (bos and text.startswith(bos))
        if images:
            out = self.processor(text=[text], images=[images] if self.arch.name in PER_SAMPLE_VISION else images,
                                 add_special_tokens=add_special, return_tensors="pt")
            ids = out.pop("input_ids")[0].tolist()
            out.pop("attention_mask", None)
            bos_id = self.tokenizer.bos_token_id
            if bos and not add_special and bos not in text and bos_id in ids:
                # mllama's processor puts a BOS in front of ANY text holding an image, even with
                # add_special_tokens=False: in a later turn that would be a BOS mid-conversation.
                keep = torch.tensor([t != bos_id for t in ids])
                ids = [t for t in ids if t != bos_id]
                out.update({k: out[k][:, keep] for k in TOKEN_ALIGNED if k in out})
            return ids, dict(out)
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"], {}

    def encode(self, messages: list[Message], images: list, add_generation_prompt: bool = False,
               memo: dict | None = None, end_at_last_target: bool = False, last_answer_only: bool = False) -> Encoded:
        """memo: a dict shared by encodes of conversations with the SAME images (a prompt and its K
        responses): a segment already tokenised there (the prompt, with its image processing) is reused.
        end_at_last_target: the sequence ends with the last answer's end token, without the separator some
        templates write after it (ChatML's newline, llava-hf LLaVA-1.5's space): a reward model reading its
        last token then reads the same token in every row, whether or not a separator would have fit.
        last_answer_only: the last answer is the one target (the earlier ones are context)."""
        segs = self.segments(messages, add_generation_prompt)
        if last_answer_only:
            last = max((k for k, (_, target) in enumerate(segs) if target), default=-1)
            segs = [(text, target and k == last) for k, (text, target) in enumerate(segs)]
        while end_at_last_target and segs and not segs[-1][1]:
            segs = segs[:-1]
        n_needed = sum(t.count(self.image_token) for t, _ in segs)
        if n_needed != len(images):  # (a rollout or an expert's text can spell "<image>": that row, not the run)
            raise RowNotEncodable(f"conversation has {n_needed} image placeholders but {len(images)} images")
        pieces, img_i, before = [], 0, ""  # (ids, is_target, vision, n_images)
        for k, (text, target) in enumerate(segs):
            n, context = text.count(self.image_token), self._context(before)
            key = (k, img_i, context, text)
            if memo is not None and key in memo:
                ids, vision = memo[key]
            else:
                ids, vision = self._tokenize(text, images[img_i:img_i + n], first=k == 0, context=context)
                if memo is not None:
                    memo[key] = ids, vision
            pieces.append((ids, target, vision, n))
            img_i, before = img_i + n, before + text
        return self._assemble(pieces, whole=add_generation_prompt)

    def _assemble(self, pieces, whole: bool = False) -> Encoded:
        """whole: a prompt to answer (generation), which must fit entirely."""
        ids, labels, kept = [], [], []
        for seg_ids, target, vision, n_img in pieces:
            room = self.max_seq_len - len(ids)
            if len(seg_ids) > room:
                if n_img or not target:  # never cut image tokens or a prompt: stop before it
                    break
                seg_ids = seg_ids[:room]
            ids += seg_ids
            labels += seg_ids if target else [IGNORE] * len(seg_ids)
            kept.append((len(ids) - len(seg_ids), target, vision))
            if len(ids) >= self.max_seq_len:
                break
        # truncated: a target lost tokens (a prompt to answer: anything lost); a separator after the last
        # answer that did not fit changes no label
        n_target_tokens = sum(len(p[0]) for p in pieces if p[1])
        truncated = sum(x != IGNORE for x in labels) < n_target_tokens or (whole and len(ids) < sum(
            len(p[0]) for p in pieces))
        prompt_tokens = sum(len(p[0]) for p in pieces if not p[1])
        if not any(t for _, t, _ in kept) and any(t for _, t, _, _ in pieces):
            raise PromptTooLong(f"prompt of {prompt_tokens} tokens leaves no "
                                f"room for a response within max_seq_len={self.max_seq_len}")
        if whole and truncated:  # a prompt to answer, cut: its question would be lost
            raise PromptTooLong(f"prompt of {prompt_tokens} tokens (its image tokens included) exceeds "
                                f"max_seq_len={self.max_seq_len}: raise --max_seq_len")
        starts = [s for s, t, _ in kept if t]
        prompt_len = starts[-1] if starts else len(ids)
        vision = merge_vision([(s, v) for s, _, v in kept if v], self.arch.name, len(ids))
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       vision, prompt_len, truncated)


def pad_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate on `dim`, zero-padding every other dim to the largest size (padding is never read:
    LLaVA-NeXT slices its patches by image_sizes, Idefics3 masks by pixel_attention_mask and drops
    all-zero images, mllama masks tiles by aspect_ratio_mask)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = []
    for t in tensors:
        pad = []
        for d in reversed(range(t.dim())):
            pad += [0, 0 if d == dim else shape[d] - t.shape[d]]
        out.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(out, dim=dim)


def merge_vision(parts: list[tuple[int, dict]], arch_name: str, seq_len: int) -> dict:
    """Join the pixel inputs of the image-bearing segments of ONE sample: parts = [(token offset of
    the segment, its processor outputs)]. Per-image inputs are concatenated in image order; the
    token-aligned ones are rebuilt for the whole sequence of seq_len tokens."""
    if not parts:
        return {}
    image_dim = 1 if arch_name in PER_SAMPLE_VISION else 0
    keys = [k for k in parts[0][1] if k not in TOKEN_ALIGNED]
    out = {k: pad_cat([v[k] for _, v in parts], image_dim) if len(parts) > 1 else parts[0][1][k] for k in keys}
    if "mm_token_type_ids" in parts[0][1]:  # Qwen2-VL: image tokens 1, text 0
        full = torch.zeros((1, seq_len), dtype=parts[0][1]["mm_token_type_ids"].dtype)
        for off, v in parts:
            t = v["mm_token_type_ids"][:, :seq_len - off]
            full[:, off:off + t.shape[1]] = t
        out["mm_token_type_ids"] = full
    if "cross_attention_mask" in parts[0][1]:
        out["cross_attention_mask"] = _mllama_cross_attention(parts, seq_len)
    return out


def _mllama_cross_attention(parts: list[tuple[int, dict]], seq_len: int) -> torch.Tensor:
    """mllama's (1, T, n_images, max_tiles) mask for the whole sample, as its processor builds it for one
    text: each segment's rows at its offset, its images' columns after the previous segments' images;
    then every row with no image (text after an image segment, or before the segment's first image
    token) attends to what the last row before it attended to: the most recent image(s). Rows before
    the first image attend to nothing."""
    masks = [v["cross_attention_mask"] for _, v in parts]
    n_img, tiles = sum(m.shape[2] for m in masks), max(m.shape[3] for m in masks)
    full = torch.zeros((seq_len, n_img, tiles), dtype=masks[0].dtype)
    col = 0
    for (off, _), m in zip(parts, masks):
        m = m[0, :seq_len - off]
        full[off:off + m.shape[0], col:col + m.shape[1], :m.shape[2]] = m
        col += m.shape[1]
    has = full.flatten(1).any(1)
    last = torch.where(has, torch.arange(seq_len), torch.full((seq_len,), -1)).cummax(0).values
    filled = full[last.clamp(min=0)] * (last >= 0).view(-1, 1, 1).to(full.dtype)
    return filled.unsqueeze(0)
