"""Mismatched pairs for reward-model training: a list's best response above another list's best response to the
same prompt, both read with the first list's image(s) and facts.

The other response answers the same question about another image, in the same style and at about the same
length, so neither its length nor its wording tells it apart: only checking it against this image and its facts
does. A reward model trained on pairs whose rejected answer only ever adds an error to the chosen one can instead
learn to count what a response mentions (fewer mentions, higher reward), which PPO then exploits by leaving
present objects out (`python -m benchmarks.rm_errors` measures both).
"""
from __future__ import annotations

import random
from dataclasses import replace

from training.data.records import PreferenceRecord


def prompt_key(r: PreferenceRecord) -> tuple:
    """Lists answer the same prompt when every message's role and text are equal (images aside)."""
    return tuple((m.role, m.content) for m in r.prompt)


def require_fraction(fraction: float) -> None:
    """--mismatched_pairs is a fraction of the training lists (the stage checks it before any model loads)."""
    if not 0 <= fraction <= 1:
        raise SystemExit(f"--mismatched_pairs {fraction}: give a fraction of the training lists in [0, 1]")


def mismatched_pairs(records: list[PreferenceRecord], fraction: float, seed: int) -> tuple[list, int]:
    """For each of `fraction` of the lists (chosen at random from `seed`), one pair: its best response above the
    best response of another list, chosen at random among those with the same prompt and a different best
    response. Returns the new pairs and how many chosen lists had no such other list (no pair made for them)."""
    require_fraction(fraction)
    rng = random.Random(f"mismatched-{seed}")
    by_prompt: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(prompt_key(r), []).append(i)
    chosen = sorted(rng.sample(range(len(records)), round(fraction * len(records))))
    pairs, unmatched = [], 0
    for i in chosen:
        r = records[i]
        others = [j for j in by_prompt[prompt_key(r)] if records[j].responses[0] != r.responses[0]]
        if not others:
            unmatched += 1
            continue
        o = records[rng.choice(others)]
        field = f"{r.text_field} (a mismatched pair: its rejected response is {o.source or o.id}'s best)"
        pairs.append(replace(r, id=f"{r.id}~{o.id}", responses=[r.responses[0], o.responses[0]], margin=None,
                             weights=None, text_field=field))
    return pairs, unmatched
