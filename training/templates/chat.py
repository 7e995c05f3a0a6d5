"""The one chat-template layer: conversation + images -> input_ids, labels and pixel inputs.

The rendered text comes from the processor's own chat template (or an explicit override). Each
assistant turn is located by rendering the conversation up to that turn with and without it
(the template must be prefix-stable, which is checked), so labels cover exactly the assistant
text and its end-of-turn token, on every turn; everything else is -100.

Segments are tokenised one by one: a prompt segment that holds images goes through the processor
(which expands the image placeholders exactly as the model expects and returns pixel inputs);
other segments go through the tokenizer. Truncation drops tokens from the end but never cuts an
image's tokens: a later turn whose images would be cut is dropped whole, with its images, and a
sample whose first prompt (with its images) does not fit raises `PromptTooLong`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.data.records import IMAGE_PLACEHOLDER, Message

IGNORE = -100
# Architectures whose processors return pixel inputs with a per-SAMPLE leading dimension
# (images stacked on dim 1) rather than one row per image.
PER_SAMPLE_VISION = {"idefics3", "mllama"}


class PromptTooLong(ValueError):
    """The prompt (with its image tokens) leaves no room for a response within max_seq_len."""


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE outside assistant tokens
    vision: dict = field(default_factory=dict)  # processor pixel inputs for this sample
    prompt_len: int = 0  # tokens before the LAST assistant turn (the response of a preference pair)
    truncated: bool = False


def to_hf_messages(messages: list[Message]) -> list[dict]:
    """Our messages ("<image>" in text) -> HF content parts [{"type": "image"}, {"type": "text"}]."""
    out = []
    for m in messages:
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
        self.image_token = arch.image_token

    # ---- text ----------------------------------------------------------------------------
    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        kw = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.processor.apply_chat_template(to_hf_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """[(text, is_target)]: the rendered conversation cut at assistant-turn boundaries."""
        segs, prev = [], ""
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1], add_generation_prompt=False)
            if not before.startswith(prev) or not full.startswith(before):
                raise ValueError("chat template is not prefix-stable: cannot locate assistant turn "
                                 f"{i}; pass --template with a template that renders turns in order")
            segs += [(before[len(prev):], False), (full[len(before):], True)]
            prev = full
        rest = self.render(messages, add_generation_prompt=add_generation_prompt)[len(prev):]
        if rest:
            segs.append((rest, False))
        return [s for s in segs if s[0]]

    # ---- tokens --------------------------------------------------------------------------
    def _tokenize(self, text: str, images: list, first: bool) -> tuple[list[int], dict]:
        bos = self.tokenizer.bos_token
        add_special = first and not (bos and text.startswith(bos))
        if images:
            out = self.processor(text=[text], images=[images] if self.arch.name in PER_SAMPLE_VISION else images,
                                 add_special_tokens=add_special, return_tensors="pt")
            ids = out.pop("input_ids")[0].tolist()
            out.pop("attention_mask", None)
            return ids, dict(out)
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"], {}

    def encode(self, messages: list[Message], images: list, add_generation_prompt: bool = False) -> Encoded:
        segs = self.segments(messages, add_generation_prompt)
        n_needed = sum(t.count(self.image_token) for t, _ in segs)
        if n_needed != len(images):
            raise ValueError(f"conversation has {n_needed} image placeholders but {len(images)} images")
        pieces, img_i = [], 0  # (ids, is_target, vision, n_images)
        for k, (text, target) in enumerate(segs):
            n = text.count(self.image_token)
            ids, vision = self._tokenize(text, images[img_i:img_i + n], first=k == 0)
            pieces.append((ids, target, vision, n))
            img_i += n
        return self._assemble(pieces)

    def _assemble(self, pieces) -> Encoded:
        ids, labels, kept, truncated = [], [], [], False
        for seg_ids, target, vision, n_img in pieces:
            room = self.max_seq_len - len(ids)
            if len(seg_ids) > room:
                truncated = True
                if n_img or not target:  # never cut image tokens or a prompt: stop before it
                    break
                seg_ids = seg_ids[:room]
            ids += seg_ids
            labels += seg_ids if target else [IGNORE] * len(seg_ids)
            kept.append((len(ids) - len(seg_ids), target, vision))
            if len(ids) >= self.max_seq_len:
                truncated = truncated or len(kept) < len(pieces)
                break
        if not any(t for _, t, _ in kept) and any(t for _, t, _, _ in pieces):
            raise PromptTooLong(f"prompt of {sum(len(p[0]) for p in pieces if not p[1])} tokens leaves no "
                                f"room for a response within max_seq_len={self.max_seq_len}")
        starts = [s for s, t, _ in kept if t]
        prompt_len = starts[-1] if starts else len(ids)
        vision = merge_vision([v for _, _, v in kept if v], self.arch.name, len(ids))
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       vision, prompt_len, truncated)


def merge_vision(parts: list[dict], arch_name: str, seq_len: int) -> dict:
    """Join the pixel inputs of several image-bearing segments of ONE sample."""
    if not parts:
        return {}
    if arch_name in PER_SAMPLE_VISION and len(parts) > 1:
        raise ValueError(f"{arch_name}: images must all be in one user turn")
    out = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    if "cross_attention_mask" in out:  # mllama: tokens after the image attend to it; extend to seq_len
        m = out["cross_attention_mask"]
        if m.shape[1] < seq_len:
            tail = m[:, -1:].expand(-1, seq_len - m.shape[1], *m.shape[2:])
            out["cross_attention_mask"] = torch.cat([m, tail], dim=1)
        out["cross_attention_mask"] = out["cross_attention_mask"][:, :seq_len]
    return out
