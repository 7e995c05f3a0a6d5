"""Canonical records every reader produces and every stage consumes.

Images stay as *sources* (a path relative to the image root, raw bytes, a {bytes, path} dict, base64
text, or a PIL image) until `training.data.images.load_image` opens them; readers validate them
up front so a bad image is reported with its file and row, never deep inside a collate function.
In message text, the literal "<image>" marks where the i-th image goes (LLaVA convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class RowRef:
    """Where a record came from: used in every error and skip report."""
    file: str
    row: int

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}"


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class ConversationRecord:
    """SFT: a (multi-turn) conversation; every assistant turn is a target (the last one alone when
    `last_answer_only`: a prompt-completion row, whose earlier answers are the prompt's)."""
    id: str
    messages: list[Message]
    images: list[Any] = field(default_factory=list)
    source: RowRef | None = None
    text_field: str = "conversations"  # the row's field(s) holding the text: named when it turns out bad
    last_answer_only: bool = False


@dataclass
class PreferenceRecord:
    """RM / DPO: one prompt, responses ranked best first (a pair is chosen, rejected)."""
    id: str
    prompt: list[Message]  # ends with a user message
    responses: list[str]  # len >= 2, best first
    images: list[Any] = field(default_factory=list)
    facts: list[str] | None = None  # Fact-RLHF: captions / ground-truth objects / correct option
    source: RowRef | None = None
    text_field: str = "conversations"  # the row's field(s) holding the texts: named when they turn out bad
    margin: float | None = None  # TRL's `margin` column: how far the chosen reward should exceed the rejected
    # per-token weights of the DPO family (RLAIF-V's option): per response, [[text span, weight], ...] or None
    # (weight 1), from a row's chosen_weights / rejected_weights
    weights: list[list | None] | None = None


@dataclass
class PromptRecord:
    """PPO rollouts and prediction: a prompt, optional reference answer and facts."""
    id: str
    prompt: list[Message]
    images: list[Any] = field(default_factory=list)
    reference: str | None = None
    facts: list[str] | None = None
    meta: dict = field(default_factory=dict)  # e.g. benchmark ground truth, question_id
    source: RowRef | None = None
    prompt_field: str = "prompt"  # the row's field the prompt text was read from: named when it turns out bad
