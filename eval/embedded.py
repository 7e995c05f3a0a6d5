"""Scoring on the embedded world, where the ground truth is exact.

Object mentions are the world's kind nouns (singular or plural) in a response. Per response the
distinct mentioned kinds are compared with the scene's kinds:
  CHAIR_i  = hallucinated mentions / all mentions       (distinct kinds per response)
  CHAIR_s  = responses with >= 1 hallucinated kind / all responses
  recall   = sum of distinct correct kinds / sum of ground-truth kinds
POPE-style questions use POPE's own parsing (eval.pope); counting questions read the first number word.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from eval.pope import parse_yes_no, pope_metrics
from training.world.scenes import KINDS, NUMBERS, PLURAL

_NOUNS = {**{k: k for k in KINDS}, **{p: k for k, p in PLURAL.items()}}


def mentioned_kinds(text: str) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    seen = []
    for w in words:
        k = _NOUNS.get(w)
        if k and k not in seen:
            seen.append(k)
    return seen


def chair(responses: list[str], gt: list[list[str]]) -> dict:
    n_mention = n_hal = n_resp_hal = n_correct = n_gt = n_resp_mention = 0
    for text, truth in zip(responses, gt):
        ks = mentioned_kinds(text)
        hal = [k for k in ks if k not in truth]
        n_mention += len(ks)
        n_hal += len(hal)
        n_resp_hal += bool(hal)
        n_resp_mention += bool(ks)
        n_correct += len(set(ks) & set(truth))
        n_gt += len(set(truth))
    n = max(len(responses), 1)
    return {"CHAIRs": n_resp_hal / n, "CHAIRs_refine": n_resp_hal / max(n_resp_mention, 1),
            "CHAIRi": n_hal / max(n_mention, 1), "recall": n_correct / max(n_gt, 1), "n": len(responses)}


def first_number(text: str) -> int | None:
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        if w.isdigit():
            return int(w)
        if w in NUMBERS:
            return NUMBERS.index(w)
    return None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_answers(bench: str, questions: Path, answers: Path) -> dict:
    q = {str(r["question_id"]): r for r in _rows(questions)}
    a = {str(r["question_id"]): r["text"] for r in _rows(answers)}
    missing = [k for k in q if k not in a]
    if missing:
        raise ValueError(f"{answers}: {len(missing)} questions have no answer (first: {missing[0]})")
    ids = list(q)
    if bench == "objhal":
        return chair([a[i] for i in ids], [q[i]["gt_objects"] for i in ids])
    if bench.startswith("pope"):
        return pope_metrics([parse_yes_no(a[i]) for i in ids], [q[i]["label"] for i in ids])
    if bench == "count":
        return {"accuracy": sum(first_number(a[i]) == q[i]["count"] for i in ids) / len(ids), "n": len(ids)}
    raise ValueError(f"unknown embedded benchmark {bench!r}")


BENCHES = {"objhal": "bench_objhal.jsonl", "pope_random": "bench_pope_random.jsonl",
           "pope_popular": "bench_pope_popular.jsonl", "pope_adversarial": "bench_pope_adversarial.jsonl",
           "count": "bench_count.jsonl"}
