"""Minimal corrections of a listing sentence against ground-truth facts, for OPA-DPO's ground-truth expert.

In the paper the expert (GPT-4V) rewrites the hallucinated content of a sentence and keeps the rest, so the
revised answer stays close to the policy's own rollout and its contrast with the rollout sits on the wrong words.
Where the data carries facts this is exact. A sentence is read as

    <lead> ITEM {, ITEM} [and ITEM] <tail>        ITEM = <number> [up to two words] <kind noun> [(...)]

("the image shows one blue circle, two squares ( red and green ) and one star on a white background."). Each
ITEM naming an absent kind is dropped; one whose count or other words (its colours) differ from the fact's phrase
for that kind is replaced by that phrase; kinds the response leaves out are added to the list of the response's
last listing sentence. A sentence that does not read this way returns None, and the expert falls back to the
reference answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from eval.embedded import NOUN_KIND
from training.world.scenes import NUMBERS, PLURAL

_ITEM = re.compile(r"\b(?P<num>" + "|".join(NUMBERS) + r"|\d+)\s+(?:[a-z-]+\s+){0,2}?(?P<noun>"
                   + "|".join(sorted(NOUN_KIND, key=len, reverse=True)) + r")\b(?:\s*\([^()]*\))?", re.I)
_SEP = re.compile(r"\s*(?:,\s*(?:and\s+)?|and\s+)", re.I)
_FACT = re.compile(r"\bcontains\s+(?P<phrase>.+?)\s*\.?\s*$", re.I)


@dataclass
class Item:
    kind: str
    count: int
    text: str


def fact_phrases(facts: list[str]) -> dict[str, Item]:
    """{kind: its item} from the facts that state one ("The image contains three crosses (red and blue)."); the
    facts of absent kinds ("... contains no squares.") state none."""
    out = {}
    for f in facts or []:
        m = _FACT.search(f)
        if not m or re.search(r"\bno\b", m["phrase"], re.I):
            continue
        read = read_items(m["phrase"])
        if read and len(read[1]) == 1 and not read[0] and not read[2]:
            out[read[1][0].kind] = read[1][0]
    return out


def _number(word: str) -> int:
    return int(word) if word.isdigit() else NUMBERS.index(word.lower())


def read_items(sentence: str) -> tuple[str, list[Item], str] | None:
    """(lead, items, tail), or None when the sentence is not one list of items joined by commas and "and"."""
    found = list(_ITEM.finditer(sentence))
    if not found:
        return None
    for a, b in zip(found, found[1:]):
        if not _SEP.fullmatch(sentence[a.end():b.start()]):
            return None
    items = [Item(NOUN_KIND[m["noun"].lower()], _number(m["num"]), m.group(0)) for m in found]
    if len({i.kind for i in items}) < len(items):
        return None
    return sentence[:found[0].start()], items, sentence[found[-1].end():]


def attributes(text: str) -> list[str]:
    """The item's words other than its number, its noun and "and": its colours, in order."""
    words = re.findall(r"[a-z-]+", text.lower())
    return [w for w in words if w not in NUMBERS and w not in NOUN_KIND and w != "and"]


def join_items(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def correct_sentence(sentence: str, kinds: set[str], phrases: dict[str, Item], add: list[str] = ()
                     ) -> tuple[str, list[tuple[int, str, str]]] | None:
    """The sentence with its errors corrected and the kinds in `add` listed, and its errors as (score, kind,
    reason): 1 a kind not in the image, 2 a wrong count or wrong colours, 3 a kind left out. None when it does not
    read as a list (read_items), names a kind it does not list, or would list nothing."""
    from eval.embedded import mentions
    read = read_items(sentence)
    if read is None:
        return None
    lead, items, tail = read
    if sorted(mentions(sentence)) != sorted(i.kind for i in items):  # every object noun inside an item, once
        return None
    kept, errors = [], []
    for it in items:
        if it.kind not in kinds:
            errors.append((1, it.kind, f"{it.kind} is not in the image"))
            continue
        truth = phrases.get(it.kind)
        if truth is None:
            kept.append(it.text)
        elif it.count != truth.count:
            errors.append((2, it.kind, f"the image holds {truth.count} {it.kind}(s)"))
            kept.append(truth.text)
        elif sorted(attributes(it.text)) != sorted(attributes(truth.text)):
            errors.append((2, it.kind, f"the {PLURAL[it.kind]} are {' and '.join(attributes(truth.text))}"))
            kept.append(truth.text)
        else:
            kept.append(it.text)
    for k in add:
        if k not in phrases:
            return None
        errors.append((3, k, f"leaves out {k}"))
        kept.append(phrases[k].text)
    if not kept:
        return None
    return lead + join_items(kept) + tail, errors
