"""POPE (RUCAIBox/POPE): the reference yes/no parsing and metrics with "yes" as positive.

Three splits (random, popular, adversarial), each a file of `question_id, image, text, label` rows
(POPE's `coco_pope_<split>.json`, JSON Lines). Metrics per split; LLaVA-1.5 reports F1 averaged
over the three splits and appends "\\nAnswer the question using a single word or phrase." to every
question (`--pope_suffix`, recorded in the results file).
"""
from __future__ import annotations

import sys
from pathlib import Path

SPLITS = ("random", "popular", "adversarial")
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."


def parse_yes_no(answer: str) -> str:
    """Cut at the first '.', drop commas, split on spaces: any "No"/"not"/"no" token means no."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    pairs = list(zip(preds, labels))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    n = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": len(labels)}


def average_splits(per_split: dict[str, dict]) -> dict:
    """Each metric averaged over the splits present (LLaVA-1.5's headline: f1_mean)."""
    out = {"n_splits": len(per_split)}
    for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[f"{m}_mean"] = sum(s[m] for s in per_split.values()) / len(per_split)
    for split, s in per_split.items():
        out.update({f"{split}_{m}": s[m] for m in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
    return out


def split_files(data: str | Path) -> dict[str, Path]:
    """The split files under a POPE folder (`*pope_<split>.json[l]`), or one file for one split."""
    data = Path(data)
    if data.is_file():
        split = next((s for s in SPLITS if s in data.name), data.stem)
        return {split: data}
    found = {}
    for split in SPLITS:
        hits = sorted(p for p in data.rglob(f"*pope_{split}.json*") if p.suffix in (".json", ".jsonl"))
        if len(hits) > 1:
            raise ValueError(f"{data}: {len(hits)} files for POPE's {split} split ({', '.join(map(str, hits))}): "
                             "pass the folder of one dataset (COCO, A-OKVQA or GQA)")
        if hits:
            found[split] = hits[0]
    if not found:
        raise FileNotFoundError(f"{data}: no *pope_random / *pope_popular / *pope_adversarial .json(l) files")
    if len(found) < len(SPLITS):  # LLaVA-1.5's headline is the mean over all three
        print(f"warning: {data} holds POPE's {', '.join(found)} split(s) only, not "
              f"{', '.join(s for s in SPLITS if s not in found)}: the means are over {len(found)} split(s)",
              file=sys.stderr)
    return found


# ---------------------------------------------------------------- benchmark adapter

NAME = "pope"
DEFAULT_DECODING = {"num_beams": 1, "max_new_tokens": 128}
JUDGE_MODEL = None


def add_args(p) -> None:
    g = p.add_argument_group("pope")
    g.add_argument("--pope_suffix", default=LLAVA_SUFFIX,
                   help="appended to every question (LLaVA-1.5's; pass '' for POPE's plain questions)")


def needs_judge(args) -> bool:
    return False


def data_files(args) -> list[Path]:
    return list(split_files(args.data).values())


def questions(args) -> dict[str, list[dict]]:
    from eval.answers import need
    from training.data.formats import read_table
    from training.data.prompt_formats import question_id

    out = {}
    for split, path in split_files(args.data).items():
        rows = []
        for i, r in read_table(path):
            where = f"{path}: row {i}"
            if need(r, "label", where) not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {r.get('label')!r}")
            rows.append({"question_id": question_id(r, i), "image": need(r, "image", where),
                         "text": need(r, "text", where, text=True) + args.pope_suffix, "label": r["label"]})
        out[split] = rows
    return out


def score(args, qs, answers, judge=None, decoding=None):
    per_split, per = {}, []
    for split, items in qs.items():
        preds = [parse_yes_no(answers[split][q["question_id"]]) for q in items]
        per_split[split] = pope_metrics(preds, [q["label"] for q in items])
        per += [{"split": split, "question_id": q["question_id"], "label": q["label"], "pred": p}
                for q, p in zip(items, preds)]
    return average_splits(per_split), {"splits": per_split, "prompt_suffix": args.pope_suffix}, per
