"""Reward-model pairs from an expert's corrections of a policy's own answers (iterated RLHF's fresh labels).

`bash run_opa_dpo.sh --step rollout` then `--step correct` (any policy as `--from_checkpoint`, e.g. output/ppo)
writes, in its `work/` folder, each prompt's rollout (`rollouts.jsonl`, with the prompt's facts) and the expert's
revision of it (`opa_pairs.json`). Each rollout the expert changed becomes one ranked list, [revised, rollout], in
the preference format the reward model reads (Vision-LLM-Alignment JSON, with `facts`), so that

    python -m training.rm.expert_pairs --work output/opa_dpo/work --out expert_pairs.json
    bash run_rm_training.sh --data_path data/world/preference_train.json,expert_pairs.json \\
        --image_folder data/world/images

trains a reward model on the world's pairs and on pairs drawn from the policy's distribution, whose errors
(omissions among them) the world's pairs may not hold. Rollouts the expert left as they were give no pair.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.data.readers import read_table
from training.files import write_text_atomic

ROLE = {"user": "human", "assistant": "gpt"}


def _rows(path: Path) -> list[dict]:
    """The rows of a work file (training.data.readers.read_table: a bad line is an error naming the file and line)."""
    rows = [row for _, row in read_table(path)]
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise SystemExit(f"{path}: row {bad}: expected a JSON object, got {str(rows[bad])[:80]!r}")
    return rows


def _conversation(prompt: list[dict], where: str) -> list[dict]:
    turns = []
    for i, m in enumerate(prompt):
        if m.get("role") not in ROLE or not isinstance(m.get("content"), str):
            raise SystemExit(f"{where}: field 'prompt' message {i}: expected a user or assistant turn with text "
                             f"content, got {str(m)[:80]!r}")
        turns.append({"from": ROLE[m["role"]], "value": m["content"]})
    if not turns or turns[-1]["from"] != "human":
        raise SystemExit(f"{where}: field 'prompt': the last message must be the user's question")
    return turns


def expert_pairs(work: str | Path) -> tuple[list[dict], int]:
    """The ranked lists [revised, rollout] of `work`'s rollouts that the expert changed, in prompt order, and how
    many rollouts it left unchanged (no pair)."""
    work = Path(work)
    rollouts_file, pairs_file = work / "rollouts.jsonl", work / "opa_pairs.json"
    for p in (rollouts_file, pairs_file):
        if not p.is_file():
            raise SystemExit(f"{p}: not found: run `bash run_opa_dpo.sh --step rollout` and `--step correct` "
                             f"with --output_dir {work.parent} first")
    rollouts = {r.get("key"): r for r in _rows(rollouts_file)}
    pairs = _rows(pairs_file)
    rows, unchanged = [], 0
    for n, p in enumerate(pairs):
        where = f"{pairs_file}: row {n}"
        for field in ("key", "rollout", "revised"):
            if not isinstance(p.get(field), str):
                raise SystemExit(f"{where}: field {field!r}: missing or not text")
        r = rollouts.get(p["key"])
        if r is None:
            raise SystemExit(f"{where}: field 'key': {p['key']!r} is not in {rollouts_file}")
        if r.get("rollout") != p["rollout"]:
            raise SystemExit(f"{where}: field 'rollout' differs from {rollouts_file}'s for {p['key']!r} "
                             "(the two files come from different runs)")
        if not p["revised"].strip() or p["revised"].strip() == p["rollout"].strip():
            unchanged += 1
            continue
        conv = _conversation(r.get("prompt") or [], f"{rollouts_file}: key {p['key']!r}")
        row = {"id": p["key"], "image": r.get("image"), "conversations": conv + [
            {"from": "gpt", "value": [p["revised"], p["rollout"]]}]}
        if row["image"] is None:  # a text-only prompt
            del row["image"]
        if r.get("facts"):
            row["facts"] = r["facts"]
        rows.append(row)
    return rows, unchanged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--work", required=True, help="run_opa_dpo.sh's work/ folder (after its correct step)")
    ap.add_argument("--out", required=True, help="preference JSON to write (the reward model's --data_path)")
    a = ap.parse_args(argv)
    rows, unchanged = expert_pairs(a.work)
    write_text_atomic(Path(a.out), json.dumps(rows, ensure_ascii=False))
    print(f"{len(rows)} pairs (revised > rollout) -> {a.out}; {unchanged} rollouts the expert left unchanged")


if __name__ == "__main__":
    main()
