"""Scoring on the embedded world, where the ground truth is exact.

Object mentions are the world's kind nouns (singular or plural) among a response's words, split as
eval.chair splits them (a hyphenated "star-shaped" is one word, no star), compared with the scene's kinds:
  CHAIR_i  = hallucinated mentions / all mentions       (every mention, as benchmarks.md and eval.chair)
  CHAIR_s  = responses with >= 1 hallucinated kind / all responses
  recall   = sum of distinct correct kinds / sum of ground-truth kinds
POPE-style questions use POPE's own parsing (eval.pope); counting questions read the first number word.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from eval.nouns import tokenize
from eval.pope import parse_yes_no, pope_metrics
from training.world.scenes import KINDS, NUMBERS, PLURAL

NOUN_KIND = {**{k: k for k in KINDS}, **{p: k for k, p in PLURAL.items()}}  # "crosses" -> "cross"


def mentions(text: str) -> list[str]:
    """The kind of every object noun in the text, in order, repeats kept; words as the reference scorer's
    tokenizer splits them (eval.nouns), so "star-shaped" names no star."""
    return [NOUN_KIND[w] for w in tokenize(text.lower()) if w in NOUN_KIND]


def mentioned_kinds(text: str) -> list[str]:
    """The distinct kinds the text names, in order of first mention."""
    return list(dict.fromkeys(mentions(text)))


def objhal_fields(text: str, truth: list[str]) -> dict:
    """What CHAIR counts in one answer: every object mention (n_mentions), the distinct kinds named, every mention of
    a kind not in the scene (repeats kept) and the scene's kinds left out."""
    every = mentions(text)
    named = list(dict.fromkeys(every))
    return {"gt_objects": list(truth), "n_mentions": len(every), "mentioned": named,
            "hallucinated": [k for k in every if k not in truth],
            "missed": [k for k in dict.fromkeys(truth) if k not in named]}


# Each objhal metric is sum(numerator) / sum(denominator) over the answers (0 when the denominator is 0): one
# answer's (numerator, denominator) of objhal_fields. chair_of and eval.bootstrap's resamples both sum these.
RATIOS = {
    "CHAIRs": lambda r: (int(bool(r["hallucinated"])), 1),
    "CHAIRs_refine": lambda r: (int(bool(r["hallucinated"])), int(bool(r["mentioned"]))),
    "CHAIRi": lambda r: (len(r["hallucinated"]), r["n_mentions"]),
    "recall": lambda r: (len(set(r["gt_objects"])) - len(r["missed"]), len(set(r["gt_objects"]))),
}


def chair_of(records: list[dict]) -> dict:
    """CHAIR over answers' objhal_fields."""
    out = {}
    for name, parts in RATIOS.items():
        num, den = (sum(x) for x in zip(*(parts(r) for r in records))) if records else (0, 0)
        out[name] = num / den if den else 0.0
    return {**out, "n": len(records)}


def chair(responses: list[str], gt: list[list[str]]) -> dict:
    return chair_of([objhal_fields(text, truth) for text, truth in zip(responses, gt)])


def first_number(text: str) -> int | None:
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        if w.isdigit():
            return int(w)
        if w in NUMBERS:
            return NUMBERS.index(w)
    return None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def question_record(bench: str, q: dict, text: str) -> dict:
    """One answer as its benchmark scores it (also its .per_question.jsonl row): objhal_fields for objhal, the
    parsed prediction for POPE and count questions."""
    row = {"bench": bench, "question_id": q["question_id"], "answer": text}
    if bench == "objhal":
        return {**row, **objhal_fields(text, q["gt_objects"])}
    if bench.startswith("pope"):
        return {**row, "label": q["label"], "pred": parse_yes_no(text)}
    if bench == "count":
        return {**row, "count": q["count"], "pred": first_number(text)}
    raise ValueError(f"unknown embedded benchmark {bench!r}")


def records_of(bench: str, rows: list[dict], answers: dict[str, str]) -> list[dict]:
    return [question_record(bench, q, answers[str(q["question_id"])]) for q in rows]


def metrics_of(bench: str, records: list[dict]) -> dict:
    """Metrics of one embedded benchmark from its question records."""
    if bench == "objhal":
        return chair_of(records)
    if bench.startswith("pope"):
        return pope_metrics([r["pred"] for r in records], [r["label"] for r in records])
    if bench == "count":
        right = sum(r["pred"] == r["count"] for r in records)
        return {"accuracy": right / len(records) if records else 0.0, "n": len(records)}
    raise ValueError(f"unknown embedded benchmark {bench!r}")


def score_rows(bench: str, rows: list[dict], answers: dict[str, str]) -> dict:
    """Metrics of one embedded benchmark: its question rows and question_id -> answer text."""
    return metrics_of(bench, records_of(bench, rows, answers))


def score_answers(bench: str, questions: Path, answers: Path) -> dict:
    q = {str(r["question_id"]): r for r in _rows(questions)}
    a = {str(r["question_id"]): r["text"] for r in _rows(answers)}
    missing = [k for k in q if k not in a]
    if missing:
        raise ValueError(f"{answers}: {len(missing)} questions have no answer (first: {missing[0]})")
    return score_rows(bench, list(q.values()), a)


BENCHES = {"objhal": "bench_objhal.jsonl", "pope_random": "bench_pope_random.jsonl",
           "pope_popular": "bench_pope_popular.jsonl", "pope_adversarial": "bench_pope_adversarial.jsonl",
           "count": "bench_count.jsonl"}
HEADLINE = [("objhal", "CHAIRi"), ("objhal", "CHAIRs"), ("objhal", "recall"), ("pope_random", "f1"),
            ("pope_adversarial", "f1"), ("count", "accuracy")]


# ---------------------------------------------------------------- benchmark adapter

NAME = "embedded"
DEFAULT_DECODING = {"num_beams": 1, "max_new_tokens": 64}
DEFAULT_DATA = "data/world"
JUDGE_MODEL = None


def add_args(p) -> None:
    g = p.add_argument_group("embedded (the embedded world's held-out benchmarks; --data is the world folder)")
    g.add_argument("--embedded_benches", nargs="*", default=None, choices=list(BENCHES))


def needs_judge(args) -> bool:
    return False


def _benches(args) -> list[str]:
    return list(args.embedded_benches or BENCHES)


def data_files(args) -> list[Path]:
    return [Path(args.data) / BENCHES[b] for b in _benches(args)]


def questions(args) -> dict[str, list[dict]]:
    out = {}
    for b in _benches(args):
        rows = _rows(Path(args.data) / BENCHES[b])
        out[b] = [{**r, "question_id": str(r["question_id"])} for r in rows]
    return out


def score(args, qs, answers, judge=None, decoding=None):
    per = {b: records_of(b, qs[b], answers[b]) for b in qs}
    results = {b: metrics_of(b, per[b]) for b in qs}
    metrics = {f"{b}/{m}": v for b, r in results.items() for m, v in r.items() if m != "n"}
    return metrics, {"results": results}, [r for b in qs for r in per[b]]
