"""Fact-RLHF (LLaVA-RLHF): what the reward model reads besides image, question and response.

A factual reward model sees, after the response, one more user turn holding the image's facts
(captions, ground-truth objects, the correct multiple-choice option):

    USER: <image> question  ASSISTANT: response  USER: FACTUAL_PREFIX fact_1 fact_2 ...  ASSISTANT:

This is where LLaVA-RLHF puts it (its reward prompt follows the response and carries the
`{factual_prompt}`), and the reward is read at the final token, which has read everything. Because
the block comes after the response, the hidden states of the prompt and response tokens do not
depend on it: a critic initialised from a factual reward model computes per-token values on the
policy's own sequences. The same messages are built at training and at scoring time (best-of-n,
PPO), so the factual switch means the same thing everywhere.
"""
from __future__ import annotations

import random

from training.data.records import Message

# LLaVA-RLHF's wording; the tiny VLM's vocabulary holds every word of it.
FACTUAL_PREFIX = "the response should be fully supported by the combination of the following captions:"


class MissingFacts(ValueError):
    """Factual mode needs facts and this sample has none."""


def has_facts(facts: list[str] | None) -> bool:
    """Whether a sample carries facts for the factual block: a fact that is not blank."""
    return any(f and f.strip() for f in facts or [])


def with_facts(records, report) -> list:
    """The records that carry facts, for a factual reward model; each other one is a bad row of `report`
    (field "facts": an error, or with --skip_bad_rows skipped and counted)."""
    kept = []
    for r in records:
        if has_facts(r.facts):
            kept.append(r)
        else:
            report.bad(r.source, "facts", "missing: a factual reward model reads each row's facts (captions, "
                                          "ground-truth objects or the correct option); add them (--captions_file "
                                          "for LLaVA-RLHF data), or pass --no-factual")
    return kept


def factual_block(facts: list[str], shuffle_seed: int | str | None = None) -> str:
    """The factual block; facts shuffled (LLaVA-RLHF shuffles captions) when a seed is given."""
    facts = [f.strip() for f in facts if f and f.strip()]
    if not facts:
        raise MissingFacts("factual mode: this sample has no facts (captions, ground-truth objects or "
                           "correct option); give them, pass --captions_file, or use --no-factual")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(facts)
    return FACTUAL_PREFIX + "\n" + "\n".join(facts)


def rm_messages(prompt: list[Message], response: str, facts: list[str] | None = None,
                factual: bool = False, shuffle_seed: int | str | None = None) -> list[Message]:
    """The conversation a reward model scores; encode it with add_generation_prompt=factual."""
    messages = [*prompt, Message("assistant", response)]
    if factual:
        messages.append(Message("user", factual_block(facts or [], shuffle_seed)))
    return messages
