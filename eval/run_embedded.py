"""Generate and score every embedded-world benchmark for one or more models; print a table.

    python -m eval.run_embedded --models output/sft [output/dpo ...] --world data/world

Each model's results go to <model>/eval_embedded.json (the same file `python -m eval.benchmark
--benchmark embedded` writes, which `python -m eval.report` reads); with some of the benchmarks (--benches)
or other decoding (--num_beams) to eval_embedded_<run name>.json (--run_name, default from those settings),
so the all-benchmark greedy results stay. Answers made by an older version of a model (same folder, rewritten
weights), for images since rewritten (a world generated anew) or by other generation code (training.predict and
the modules it imports: eval.answers.generation_code) are generated again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eval.embedded import BENCHES, HEADLINE


def evaluate(model_path: str, world: str, batch_size: int = 64, benches=None, num_beams: int = 1,
             progress: bool = True, run_name: str = "") -> dict:
    from eval.benchmark import build_parser, run

    argv = ["--benchmark", "embedded", "--model_path", model_path, "--data", world, "--image_folder",
            str(Path(world) / "images"), "--batch_size", str(batch_size), "--num_beams", str(num_beams),
            "--restart_answers"] + ([] if progress else ["--no-progress"])
    if benches:
        argv += ["--embedded_benches", *benches]
    if run_name:  # eval_embedded_<run_name>.json: the model's eval_embedded.json (all benches) stays as it is
        argv += ["--run_name", run_name]
    record = run(build_parser().parse_args(argv))
    record["results"] = record["details"]["results"]
    return record


def table(rows: list[dict]) -> str:
    head = "| model | " + " | ".join(f"{b} {m}" for b, m in HEADLINE) + " |"
    lines = [head, "|" + "---|" * (len(HEADLINE) + 1)]
    for r in rows:
        cells = [f"{r['results'][b][m]:.3f}" if b in r["results"] else "-" for b, m in HEADLINE]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--world", default="data/world")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--benches", nargs="*", default=None, choices=list(BENCHES))
    p.add_argument("--table_file", default="")
    p.add_argument("--run_name", default=None,
                   help="results (and answers) under this name (default: none for all benchmarks greedy, else "
                        "from --benches / --num_beams)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    run_name = a.run_name
    if run_name is None:  # a subset or other decoding replaced the model's all-benchmark greedy results
        subset = a.benches is not None and sorted(a.benches) != sorted(BENCHES)
        run_name = "_".join(([*sorted(a.benches)] if subset else []) +
                            ([f"beams{a.num_beams}"] if a.num_beams != 1 else []))
    rows = [evaluate(m, a.world, a.batch_size, a.benches, a.num_beams, a.progress, run_name) for m in a.models]
    t = table(rows)
    if a.table_file:
        Path(a.table_file).write_text(t + "\n")
    print(t)
    return t


if __name__ == "__main__":
    main()
