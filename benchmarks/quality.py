"""Does alignment cut hallucination on the embedded world? One command prints it all.

    python -m benchmarks.quality                 # DPO, ORPO and PPO from output/sft (made by run_sft.sh)
    python -m benchmarks.quality --with_opa      # + OPA-DPO (run_opa_dpo.sh) on a third of DPO's pairs
    python -m benchmarks.quality --reuse         # score existing output/dpo, ... without training
    python -m benchmarks.quality --methods dpo   # only some methods

PPO uses the reward model in output/rm (trained by run_rm_training.sh first when missing).

Trains each method with its stage script's defaults (bash run_dpo_training.sh ...), then generates
greedy descriptions of the held-out scenes (bench_objhal) and scores CHAIR_i (share of mentioned
object kinds that are absent) and object recall against the SFT model. Targets: CHAIR_i at most
half of SFT's; recall at most 0.03 below SFT's; OPA-DPO reaches DPO's CHAIR_i with at most a third
of DPO's preference pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(script: str, out: str, *args: str) -> None:
    cmd = ["bash", script, "--output_dir", out, *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def score(model: str, world: str) -> dict:
    from eval.run_embedded import evaluate
    pred = Path(model) / "predictions" / "embedded_objhal.jsonl"
    if pred.exists():
        pred.unlink()  # always score the model as it is now
    return evaluate(model, world, benches=["objhal"])["results"]["objhal"]


def pairs_used(out: str) -> int:
    """Distinct preference items the run trained on (rows of its data file): a pair for DPO / ORPO, a
    prompt for OPA-DPO (from which its four pairs are built)."""
    cfg = json.loads((Path(out) / "run_config.json").read_text())
    from training.data.readers import read_table
    return sum(sum(1 for _ in read_table(p)) for p in cfg["data"]["data_path"].split(","))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="output/sft")
    p.add_argument("--world", default="data/world")
    p.add_argument("--reuse", action="store_true", help="score existing outputs; train only what is missing")
    p.add_argument("--with_opa", action="store_true", help="also run OPA-DPO (run_opa_dpo.sh)")
    p.add_argument("--methods", nargs="*", default=["dpo", "orpo", "ppo"])
    a = p.parse_args(argv)
    os.chdir(ROOT)
    if not (Path(a.sft) / "config.json").exists():
        raise SystemExit(f"{a.sft} holds no SFT model: run `bash run_sft.sh` first")
    runs = {"dpo": ("run_dpo_training.sh", "output/dpo", ["--from_checkpoint", a.sft]),
            "orpo": ("run_dpo_training.sh", "output/orpo", ["--from_checkpoint", a.sft, "--loss_type", "orpo"]),
            "opa_dpo": ("run_opa_dpo.sh", "output/opa_dpo", ["--from_checkpoint", a.sft]),
            "ppo": ("run_ppo_training.sh", "output/ppo", ["--from_checkpoint", a.sft])}
    methods = list(a.methods) + (["opa_dpo"] if a.with_opa and "opa_dpo" not in a.methods else [])
    if "ppo" in methods and not (Path("output/rm") / "config.json").exists():
        train("run_rm_training.sh", "output/rm", "--from_checkpoint", a.sft)
    for m in methods:
        script, out, args = runs[m]
        if not (a.reuse and (Path(out) / "config.json").exists()):
            train(script, out, *args)
    results = {"sft": score(a.sft, a.world)}
    for m in methods:
        results[m] = score(runs[m][1], a.world)
    base = results["sft"]
    lines = ["| model | CHAIR_i | CHAIR_s | recall | CHAIR_i / SFT | recall - SFT | training rows | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for name, r in results.items():
        ratio = r["CHAIRi"] / base["CHAIRi"] if base["CHAIRi"] else float("nan")
        drop = r["recall"] - base["recall"]
        n_pairs = "-" if name == "sft" else f"{pairs_used(runs[name][1]):.0f}"
        if name == "sft":
            verdict = "baseline"
        else:
            ok = ratio <= 0.5 and drop >= -0.03
            if name == "opa_dpo" and "dpo" in results:
                ok = (r["CHAIRi"] <= results["dpo"]["CHAIRi"] and drop >= -0.03
                      and pairs_used(runs["opa_dpo"][1]) <= pairs_used(runs["dpo"][1]) / 3)
            verdict = "PASS" if ok else "FAIL"
        verdicts[name] = verdict
        lines.append(f"| {name} | {r['CHAIRi']:.3f} | {r['CHAIRs']:.3f} | {r['recall']:.3f} | {ratio:.2f} | "
                     f"{drop:+.3f} | {n_pairs} | {verdict} |")
    table = "\n".join(lines)
    print("\nObject hallucination on the embedded world's held-out scenes (bench_objhal, greedy):\n" + table)
    print("targets: CHAIR_i <= 0.5 x SFT, recall >= SFT - 0.03; OPA-DPO: CHAIR_i <= DPO's with <= 1/3 of its pairs")
    Path("output").mkdir(exist_ok=True)
    Path("output/quality.md").write_text(table + "\n")
    return {"results": results, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(0 if all(v in ("PASS", "baseline") for v in main()["verdicts"].values()) else 1)
