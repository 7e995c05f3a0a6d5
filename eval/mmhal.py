"""MMHal-Bench (LLaVA-RLHF `Eval/eval_gpt_mmhal.py`): an LLM judge rates each answer 0-6.

Data: MMHal's `response_template.json`, 96 records `question_type, question_topic, image_id,
image_src, image_content, question, gt_answer, model_answer`. Images are read locally: the record's
`image` / `image_path` if it has one, else the file name of `image_src` in --image_folder.

Judge: the published prompt (prompts/mmhal_judge.txt) with the image contents joined by ", ",
one user message, temperature 0 (gpt-4-0314 by default). Rating: exactly one "rating: s"
(s = 0..6) in the lowercased reply, else 0. Score = mean rating; hallucination rate = share of
ratings < 3; per question type by index mod 8 in the fixed order below.
"""
from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

PROMPT = Path(__file__).parent / "prompts" / "mmhal_judge.txt"
TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")


def parse_rating(reply: str) -> int:
    found = [s for s in range(7) if f"rating: {s}" in reply.lower()]
    return found[0] if len(found) == 1 else 0


def mmhal_metrics(ratings: list[int]) -> dict:
    n = len(ratings)
    out = {"score": sum(ratings) / n if n else 0.0,
           "hallucination_rate": sum(r < 3 for r in ratings) / n if n else 0.0, "n": n}
    for t, name in enumerate(TYPES):
        each = ratings[t::8]
        out[f"score_{name}"] = sum(each) / len(each) if each else 0.0
    return out


def judge_prompt(record: dict, answer: str) -> str:
    return PROMPT.read_text().format(", ".join(record["image_content"]), record["question"], record["gt_answer"],
                                     answer)


def _image(record: dict) -> str:
    for k in ("image", "image_path"):
        if record.get(k):
            return record[k]
    src = record.get("image_src", "")
    name = Path(urllib.parse.urlsplit(src).path).name
    if not name:
        raise ValueError(f"MMHal record {record.get('image_id')!r} has no image, image_path or image_src")
    return name


# ---------------------------------------------------------------- benchmark adapter

NAME = "mmhal"
DEFAULT_DECODING = {"num_beams": 1, "max_new_tokens": 1024}
JUDGE_MODEL = "gpt-4-0314"
JUDGE_DECODING = {"temperature": 0.0, "max_tokens": None}


def add_args(p) -> None:
    pass


def needs_judge(args) -> bool:
    return True


def data_files(args) -> list[Path]:
    return [Path(args.data)]


def _records(args) -> list[dict]:
    from eval.answers import need, read_json

    records = read_json(args.data)
    if not isinstance(records, list):
        raise ValueError(f"{args.data}: expected MMHal's response_template.json (a JSON list of records)")
    for i, r in enumerate(records):  # the fields the judge's prompt is filled with, checked before any answer
        for key in ("question", "image_content", "gt_answer"):
            need(r, key, f"{args.data}, record {i}", text=key != "image_content")
        if not isinstance(r["image_content"], list):  # ", ".join of a text would put a comma between its letters
            raise ValueError(f"{args.data}, record {i}: 'image_content' must be a list of object names, got "
                             f"{type(r['image_content']).__name__}")
    return records


def questions(args) -> dict[str, list[dict]]:
    return {"": [{"question_id": str(i), "image": _image(r), "text": r["question"]}
                 for i, r in enumerate(_records(args))]}


def score(args, qs, answers, judge=None, decoding=None):
    records = _records(args)
    warnings = []
    if len(records) != 96:  # MMHal's scorer asserts its 96 records: its types are by index mod 8
        warnings.append(f"{args.data}: {len(records)} records, not MMHal's 96 in type order: the per-type scores "
                        "(by index mod 8, as MMHal's scorer) are only right for those")
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    ratings, per = [], []
    for i, record in enumerate(records):
        answer = answers[""][str(i)]
        reply = judge.chat([{"role": "user", "content": judge_prompt(record, answer)}], **decoding)
        ratings.append(parse_rating(reply))
        per.append({"question_id": str(i), "question_type": TYPES[i % 8], "rating": ratings[-1],
                    "model_answer": answer, "judge_reply": reply})
    # MMHal's own format, answers filled in; named like the answer files (mmhal[_<run_name>]) so runs keep theirs
    out = Path(args.answers_dir) / f"mmhal{'_' + args.run_name if getattr(args, 'run_name', '') else ''}_response.json"
    out.write_text(json.dumps([{**r, "model_answer": answers[""][str(i)]} for i, r in enumerate(records)], indent=1))
    return mmhal_metrics(ratings), {"types_by_index_mod_8": list(TYPES), "response_file": str(out),
                                    "warnings": warnings}, per
