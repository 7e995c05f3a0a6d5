"""LLaVA-Bench in-the-wild (LLaVA `llava/eval/eval_gpt_review_bench.py`, `summarize_gpt_review.py`).

Data folder (downloaded by the user): questions.jsonl (`question_id, image, text, category` with
category conv / detail / complex), answers_gpt4.jsonl (the reference answers), context.jsonl
(`image, caption`), images/. The judge sees the image's caption, the question, the reference as
Assistant 1 and the model's answer as Assistant 2 and the category's rule (prompts/
llava_bench_rule.json, LLaVA's `table/rule.json` entries), with LLaVA's system message, temperature
0.2 and 1024 tokens (gpt-4-0314 by default). Its reply's first line, commas made spaces, must split
on ' ' into exactly two numbers, else the pair is (-1, -1), counted in the means as LLaVA does.
Relative score = mean(model) / mean(reference) * 100, overall and per category.
"""
from __future__ import annotations

import json
from pathlib import Path

from eval.answers import need, read_json

RULES = Path(__file__).parent / "prompts" / "llava_bench_rule.json"
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


def parse_score(review: str) -> list[float]:
    try:
        sp = review.split("\n")[0].replace(",", " ").split(" ")
        if len(sp) == 2:
            return [float(sp[0]), float(sp[1])]
    except ValueError:
        pass
    return [-1.0, -1.0]


def review_content(caption: str, question: str, reference: str, answer: str, rule: dict) -> str:
    role = rule["role"]
    return (f"[Context]\n{caption}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def relative_scores(pairs: list[list[float]], categories: list[str]) -> dict:
    """relative_score (all) and relative_<category>, plus the mean reference and model scores."""
    groups: dict[str, list[list[float]]] = {"all": pairs}
    for p, c in zip(pairs, categories):
        groups.setdefault(c, []).append(p)
    out = {}
    for name, ps in groups.items():
        ref = sum(p[0] for p in ps) / len(ps) if ps else 0.0
        model = sum(p[1] for p in ps) / len(ps) if ps else 0.0
        key = "relative_score" if name == "all" else f"relative_{name}"
        out[key] = model / ref * 100 if ref else 0.0
        if name == "all":
            out.update(reference_mean=ref, model_mean=model)
    out["parse_failures"] = sum(p == [-1.0, -1.0] for p in pairs)
    out["n"] = len(pairs)
    return out


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line."""
    return [(n, json.loads(line)) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip()]


# ---------------------------------------------------------------- benchmark adapter

NAME = "llava_bench"
DEFAULT_DECODING = {"num_beams": 1, "max_new_tokens": 1024}
JUDGE_MODEL = "gpt-4-0314"
JUDGE_DECODING = {"temperature": 0.2, "max_tokens": 1024}


def add_args(p) -> None:
    g = p.add_argument_group("llava_bench")
    g.add_argument("--llava_rule_file", default=str(RULES), help="LLaVA's rule.json (llava_bench_* entries)")


def needs_judge(args) -> bool:
    return True


def data_files(args) -> list[Path]:
    d = Path(args.data)
    return [d / "questions.jsonl", d / "answers_gpt4.jsonl", d / "context.jsonl", Path(args.llava_rule_file)]


def _judged_files(args) -> tuple[dict[str, str], dict[str, dict], dict]:
    """(question_id -> reference answer, image -> context row, rules)."""
    d = Path(args.data)
    refs = {str(need(a, "question_id", f"{d / 'answers_gpt4.jsonl'}, line {n}")):
            need(a, "text", f"{d / 'answers_gpt4.jsonl'}, line {n}") for n, a in _jsonl(d / "answers_gpt4.jsonl")}
    context = {need(c, "image", f"{d / 'context.jsonl'}, line {n}", text=True): c
               for n, c in _jsonl(d / "context.jsonl")}
    return refs, context, read_json(args.llava_rule_file)


def questions(args) -> dict[str, list[dict]]:
    """The questions, each checked for what its judging needs (a rule, a reference answer, its image's caption)
    before any answer is generated."""
    d = Path(args.data)
    refs, context, rules = _judged_files(args)
    out = []
    for n, q in _jsonl(d / "questions.jsonl"):
        where = f"{d / 'questions.jsonl'}, line {n}"
        row = {k: need(q, k, where, text=k != "question_id")
               for k in ("question_id", "image", "text", "category")}
        row["question_id"] = str(row["question_id"])
        if "llava_bench_" + row["category"] not in rules:
            raise ValueError(f"{args.llava_rule_file}: no rule for category {'llava_bench_' + row['category']!r}")
        if row["question_id"] not in refs:
            raise ValueError(f"{d / 'answers_gpt4.jsonl'}: no reference answer for question {row['question_id']}")
        if "caption" not in context.get(row["image"], {}):
            raise ValueError(f"{where}: image {row['image']!r} is not in {d / 'context.jsonl'} (with a caption)")
        out.append(row)
    return {"": out}


def score(args, qs, answers, judge=None, decoding=None):
    refs, context, rules = _judged_files(args)
    pairs, cats, per = [], [], []
    for q in qs[""]:
        qid, category = q["question_id"], "llava_bench_" + q["category"]
        caption = context[q["image"]]["caption"]
        caption = "\n".join(caption) if isinstance(caption, list) else caption
        content = review_content(caption, q["text"], refs[qid], answers[""][qid], rules[category])
        reply = judge.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], **decoding)
        pairs.append(parse_score(reply))
        cats.append(q["category"])
        per.append({"question_id": qid, "category": q["category"], "tuple": pairs[-1], "judge_reply": reply})
    return relative_scores(pairs, cats), {"system_prompt": SYSTEM}, per
