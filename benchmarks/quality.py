"""Does alignment cut hallucination on the embedded world? One command prints it all.

    python -m benchmarks.quality                 # DPO, ORPO and PPO from output/sft (made by run_sft.sh)
    python -m benchmarks.quality --with_opa      # + OPA-DPO (run_opa_dpo.sh) on a third of DPO's pairs
    python -m benchmarks.quality --reuse         # score existing output/dpo, ... without training
    python -m benchmarks.quality --methods dpo   # only some methods (OPA-DPO: DPO too, its target's measure)
    python -m benchmarks.quality --seeds 3       # each method with 3 training seeds; verdicts on the means

PPO uses the reward model in output/rm (trained by run_rm_training.sh first when missing or older than the
SFT model); --reuse keeps a model only when it was trained after the models it starts from.

Trains each method with its stage script's defaults (bash run_dpo_training.sh ...), then generates
greedy descriptions of the held-out scenes (bench_objhal) and scores CHAIR_i (share of object
mentions that name an absent kind) and object recall against the SFT model. Targets: CHAIR_i at most
half of SFT's; recall at most 0.03 below SFT's; OPA-DPO reaches DPO's CHAIR_i with at most a third
of DPO's preference pairs. After the table: the first seeds' paired bootstrap intervals (eval.bootstrap) against
SFT and OPA-DPO's against DPO, which say how large a difference the 300 scenes resolve.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(script: str, out: str, *args: str) -> None:
    cmd = ["bash", script, "--output_dir", out, *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_name_for(world: str) -> str:
    """The run name a world's scores are kept under in each model folder: "quality" for the reported benchmark
    (data/world), another per world (--world /tmp/valworld wrote its scores over the reported ones)."""
    from eval.embedded import DEFAULT_DATA
    path = Path(world).resolve()
    if path == (ROOT / DEFAULT_DATA).resolve():
        return "quality"
    tag = re.sub(r"[^A-Za-z0-9]+", "-", path.name).strip("-") or "world"
    return f"quality_{tag}_{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def score(model: str, world: str) -> dict:
    from eval.run_embedded import evaluate
    run_name = run_name_for(world)
    pred = Path(model) / "predictions" / f"embedded_{run_name}_objhal.jsonl"
    if pred.exists():
        pred.unlink()  # always score the model as it is now
    # its own run name: the model's eval_embedded.json (POPE, counts: what eval.report reads) is kept
    return evaluate(model, world, benches=["objhal"], run_name=run_name)["results"]["objhal"]


def intervals(sft: str, first_seed: dict[str, str], run_name: str = "quality") -> list[str]:
    """How much of each difference the scenes resolve: eval.bootstrap's paired intervals for the first seed of each
    method against SFT and, with OPA-DPO, of OPA-DPO against DPO (its target)."""
    from eval.bootstrap import table
    out = ["", f"First seeds, paired bootstrap over the scenes (`python -m eval.bootstrap --run_name {run_name}`):",
           "", table(sft, list(first_seed.values()), run_name, figure="figure/quality_intervals.png")]
    if "opa_dpo" in first_seed and "dpo" in first_seed:
        out += ["", table(first_seed["dpo"], [first_seed["opa_dpo"]], run_name)]
    return out


def trained_after(out: str, *inputs: str) -> bool:
    """Whether `out` holds a model whose weights were written after every input model's (SFT's; PPO: the reward
    model's too): a model trained from an earlier SFT model in the same folder is not reused against a new one."""
    from training.model.builder import saved_model_files

    def times(d):
        return [f.stat().st_mtime for f in saved_model_files(Path(d))]
    mine = times(out)
    return bool(mine) and all(min(mine) >= max(times(d) or [0.0]) for d in inputs)


def pairs_used(out: str) -> int:
    """Distinct preference items the run trained on (rows of its data file): a pair for DPO / ORPO, a
    prompt for OPA-DPO (from which its four pairs are built)."""
    cfg = json.loads((Path(out) / "run_config.json").read_text())
    from training.data.readers import read_table
    return sum(sum(1 for _ in read_table(p)) for p in cfg["data"]["data_path"].split(","))


def seed_runs(out: str, args: list[str], seeds: int, seed_flag: str, first_seed: int) -> list[tuple[str, list[str]]]:
    """(output dir, stage arguments) of each training seed: the first is the stage's default run."""
    return [(out, args)] + [(f"{out}_seed{k}", [*args, seed_flag, str(first_seed + k)]) for k in range(1, seeds)]


def mean_sd(rows: list[dict]) -> tuple[dict, dict]:
    """Per-metric mean and sample standard deviation (0 for one row) over the seeds' results."""
    import statistics as st
    keys = rows[0].keys()
    mean = {k: st.fmean(r[k] for r in rows) for k in keys}
    sd = {k: st.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0 for k in keys}
    return mean, sd


def per_seed_line(method: str, rows: list[dict], seed_flag: str, first_seed: int) -> str:
    seeds = ", ".join(str(first_seed + k) for k in range(len(rows)))
    return (f"{method} per seed ({seed_flag} {seeds}), CHAIR_i / recall: "
            + ", ".join(f"{r['CHAIRi']:.3f} / {r['recall']:.3f}" for r in rows))


def meets_target(r: dict, sft: dict, dpo: dict | None = None, pair_share: float = 0.0) -> bool:
    """The issues' target for one model's scores r: CHAIR_i at most half of SFT's (dpo given: at most DPO's, with
    at most a third of its pairs) and recall at most 0.03 below SFT's (compared without dividing or subtracting
    floats, so an SFT CHAIR_i of 0 or a drop of exactly 0.03 reads as written)."""
    hallucination = (r["CHAIRi"] <= dpo["CHAIRi"] and pair_share <= 1 / 3 if dpo is not None
                     else 2 * r["CHAIRi"] <= sft["CHAIRi"])
    return hallucination and round(sft["recall"] - r["recall"], 9) <= 0.03


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--sft", default="output/sft")
    p.add_argument("--world", default="data/world")
    p.add_argument("--reuse", action="store_true", help="score existing outputs; train only what is missing")
    p.add_argument("--with_opa", action="store_true", help="also run OPA-DPO (run_opa_dpo.sh)")
    p.add_argument("--methods", nargs="*", default=["dpo", "orpo", "ppo"], choices=["dpo", "orpo", "ppo", "opa_dpo"])
    p.add_argument("--seeds", type=int, default=1, help="train each method with this many training seeds (the "
                   "stage's default, then +1, +2, ...) and judge the means: a PPO setting's recall moves by about "
                   "0.01 between seeds on this world")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    if not (Path(a.sft) / "config.json").exists():
        raise SystemExit(f"{a.sft} holds no SFT model: run `bash run_sft.sh` first")
    runs = {"dpo": ("run_dpo_training.sh", "output/dpo", ["--from_checkpoint", a.sft]),
            "orpo": ("run_dpo_training.sh", "output/orpo", ["--from_checkpoint", a.sft, "--loss_type", "orpo"]),
            # every step anew (--force), as the other stages train anew: OPA's rollouts of an earlier SFT model in
            # its work folder stopped the run ("written with other settings")
            "opa_dpo": ("run_opa_dpo.sh", "output/opa_dpo", ["--from_checkpoint", a.sft, "--force"]),
            "ppo": ("run_ppo_training.sh", "output/ppo", ["--from_checkpoint", a.sft])}
    methods = list(a.methods) + (["opa_dpo"] if a.with_opa and "opa_dpo" not in a.methods else [])
    if "opa_dpo" in methods and "dpo" not in methods:  # OPA-DPO's target is DPO's CHAIR_i with a third of its pairs
        methods.insert(methods.index("opa_dpo"), "dpo")
    if "ppo" in methods and not trained_after("output/rm", a.sft):  # PPO's reward and critic come from it
        train("run_rm_training.sh", "output/rm", "--from_checkpoint", a.sft)
    # the training seed: OptimArgs.seed (default 1234) for the stages; OPA's own --seed (rollouts, default 0)
    seed_of = {m: ("--seed", 0 if m == "opa_dpo" else 1234) for m in methods}
    results, spread, seeds_of = {"sft": score(a.sft, a.world)}, {"sft": None}, {}
    for m in methods:
        script, out, args = runs[m]
        per_seed = []
        for k_out, k_args in seed_runs(out, args, a.seeds, *seed_of[m]):
            if not (a.reuse and trained_after(k_out, a.sft, *(["output/rm"] if m == "ppo" else []))):
                train(script, k_out, *k_args)
            per_seed.append(score(k_out, a.world))
        seeds_of[m] = per_seed
        results[m], spread[m] = mean_sd([{k: r[k] for k in ("CHAIRi", "CHAIRs", "recall")} for r in per_seed])
    base = results["sft"]

    def sd(name: str, k: str) -> str:
        return f" ± {spread[name][k]:.3f}" if spread[name] and a.seeds > 1 else ""

    lines = ([f"Means over {a.seeds} training seeds (± sample standard deviation); verdicts on the means.", ""]
             if a.seeds > 1 else [])
    lines += ["| model | CHAIR_i | CHAIR_s | recall | CHAIR_i / SFT | recall - SFT | training rows | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for name, r in results.items():
        ratio = r["CHAIRi"] / base["CHAIRi"] if base["CHAIRi"] else float("nan")
        drop = r["recall"] - base["recall"]
        n_pairs = "-" if name == "sft" else f"{pairs_used(runs[name][1]):.0f}"
        if name == "sft":
            verdict = "baseline"
        else:
            opa = name == "opa_dpo" and "dpo" in results
            verdict = "PASS" if meets_target(r, base, results["dpo"] if opa else None,
                                             pairs_used(runs[name][1]) / pairs_used(runs["dpo"][1]) if opa else 0.0
                                             ) else "FAIL"
        verdicts[name] = verdict
        lines.append(f"| {name} | {r['CHAIRi']:.3f}{sd(name, 'CHAIRi')} | {r['CHAIRs']:.3f} | "
                     f"{r['recall']:.3f}{sd(name, 'recall')} | {ratio:.2f} | "
                     f"{drop:+.3f} | {n_pairs} | {verdict} |")
    if a.seeds > 1:  # each seed's own figures: a mean near a target can hide seeds on both sides of it
        lines += ["", *(per_seed_line(m, rs, *seed_of[m]) for m, rs in seeds_of.items())]
    lines += intervals(a.sft, {m: runs[m][1] for m in methods}, run_name_for(a.world))
    table = "\n".join(lines)
    print("\nObject hallucination on the embedded world's held-out scenes (bench_objhal, greedy):\n" + table)
    print("targets: CHAIR_i <= 0.5 x SFT, recall >= SFT - 0.03; OPA-DPO: CHAIR_i <= DPO's with <= 1/3 of its pairs")
    Path("output").mkdir(exist_ok=True)
    Path("output/quality.md").write_text(table + "\n")
    return {"results": results, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(0 if all(v in ("PASS", "baseline") for v in main()["verdicts"].values()) else 1)
