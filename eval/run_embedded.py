"""Generate and score every embedded-world benchmark for one or more models; print a table.

    python -m eval.run_embedded --models output/sft [output/dpo ...] --world data/world
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.embedded import BENCHES, score_answers

HEADLINE = [("objhal", "CHAIRi"), ("objhal", "CHAIRs"), ("objhal", "recall"), ("pope_random", "f1"),
            ("pope_adversarial", "f1"), ("count", "accuracy")]


def evaluate(model_path: str, world: str, batch_size: int = 64, benches=None, num_beams: int = 1) -> dict:
    from training.predict.main import parse, predict

    results = {}
    for bench in benches or BENCHES:
        qfile = Path(world) / BENCHES[bench]
        ans = Path(model_path) / "predictions" / f"embedded_{bench}.jsonl"
        predict(parse(["--model_path", model_path, "--data_path", str(qfile), "--output_file", str(ans),
                       "--batch_size", str(batch_size), "--num_beams", str(num_beams), "--image_folder",
                       str(Path(world) / "images")]))
        results[bench] = score_answers(bench, qfile, ans)
    out = {"model": model_path, "world": world, "decoding": {"num_beams": num_beams, "greedy": True},
           "results": results}
    (Path(model_path) / "eval_embedded.json").write_text(json.dumps(out, indent=1))
    return out


def table(rows: list[dict]) -> str:
    head = "| model | " + " | ".join(f"{b} {m}" for b, m in HEADLINE) + " |"
    lines = [head, "|" + "---|" * (len(HEADLINE) + 1)]
    for r in rows:
        cells = [f"{r['results'][b][m]:.3f}" if b in r["results"] else "-" for b, m in HEADLINE]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--world", default="data/world")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--benches", nargs="*", default=None, choices=list(BENCHES))
    p.add_argument("--table_file", default="")
    a = p.parse_args(argv)
    rows = [evaluate(m, a.world, a.batch_size, a.benches, a.num_beams) for m in a.models]
    t = table(rows)
    if a.table_file:
        Path(a.table_file).write_text(t + "\n")
    print(t)
    return t


if __name__ == "__main__":
    main()
