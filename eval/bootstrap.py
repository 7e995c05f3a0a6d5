"""How sure a CHAIR comparison is: paired bootstrap over the held-out scenes of the embedded object benchmark.

    python -m eval.bootstrap --baseline output/dpo --models output/opa_dpo output/orpo [--run_name quality]

Reads each model's per-question records of `python -m eval.run_embedded` (<model>/eval_embedded[_<run_name>]
.per_question.jsonl, objhal rows) and prints, per model, CHAIR_i, CHAIR_s and recall with their 95% intervals and
the difference from the baseline with its interval. The scenes are resampled with replacement, the same draw for
every model (paired: a scene hard for one is hard for all), and each metric is recomputed as the benchmark defines it
(CHAIR_i a ratio of sums over the resampled scenes, not a mean of per-scene ratios); the interval is the percentile
one. A difference whose interval holds 0 is one the benchmark's scenes do not resolve.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eval.embedded import RATIOS
from training.engine.plots import pyplot, save_figure

PARTS = {m: RATIOS[m] for m in ("CHAIRi", "CHAIRs", "recall")}  # the metrics reported, as the benchmark sums them


def scene_parts(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-scene numerators and denominators of `metric` (eval.embedded.RATIOS)."""
    parts = np.array([PARTS[metric](r) for r in records], dtype=np.float64).reshape(-1, 2)
    return parts[:, 0], parts[:, 1]


def ratio_of_sums(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric over each resample: idx (resamples, scenes) indexes the scenes; an empty denominator gives 0,
    as eval.embedded.chair_of does."""
    n, d = num[idx].sum(-1), den[idx].sum(-1)
    return np.where(d > 0, n / np.maximum(d, 1e-12), 0.0)


def resample_indices(n_scenes: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_scenes, size=(n_resamples, n_scenes))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def compare(base: list[dict], other: list[dict], metric: str, idx: np.ndarray, level: float = 0.95) -> dict:
    """`other` against `base` on the same scenes (aligned): both values, the difference other - base, and the
    intervals of `other` and of the difference over the resamples idx."""
    nb, db = scene_parts(base, metric)
    no, do = scene_parts(other, metric)
    everything = np.arange(len(base))[None]
    value_b, value_o = ratio_of_sums(nb, db, everything)[0], ratio_of_sums(no, do, everything)[0]
    boot_b, boot_o = ratio_of_sums(nb, db, idx), ratio_of_sums(no, do, idx)
    return {"base": float(value_b), "value": float(value_o), "value_ci": interval(boot_o, level),
            "diff": float(value_o - value_b), "diff_ci": interval(boot_o - boot_b, level)}


def read_records(model: str, run_name: str) -> tuple[Path, dict[str, dict]]:
    path = Path(model) / (f"eval_embedded_{run_name}.per_question.jsonl" if run_name
                          else "eval_embedded.per_question.jsonl")
    if not path.is_file():
        raise SystemExit(f"{path}: no per-question records; run `python -m eval.run_embedded --models {model}"
                         + (f" --run_name {run_name}" if run_name else "") + "` first")
    rows = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}, line {i}: not JSON ({e.msg})") from None
        if r.get("bench") != "objhal":
            continue
        missing = [k for k in ("question_id", "hallucinated", "n_mentions", "gt_objects", "missed") if k not in r]
        if missing:
            raise SystemExit(f"{path}, line {i}: an objhal record without {', '.join(missing)}")
        if str(r["question_id"]) in rows:  # a second answer to one scene would count it twice, or hide one
            raise SystemExit(f"{path}, line {i}: question_id {r['question_id']} again")
        rows[str(r["question_id"])] = r
    if not rows:
        raise SystemExit(f"{path}: no objhal records (the run scored other benchmarks: --benches objhal)")
    return path, rows


def aligned(base: tuple[Path, dict], other: tuple[Path, dict]) -> list[dict]:
    """other's records in base's scene order; both must hold the same scenes."""
    (pb, rb), (po, ro) = base, other
    only_b, only_o = [q for q in rb if q not in ro], [q for q in ro if q not in rb]
    if only_b or only_o:
        q, where = (only_b[0], po) if only_b else (only_o[0], pb)
        raise SystemExit(f"{pb} and {po} hold other scenes ({len(only_b)} only in the first, {len(only_o)} only in "
                         f"the second; {q} is missing from {where}): score both on the same world and run name")
    return [ro[q] for q in rb]


def comparisons(baseline: str, models: list[str], run_name: str = "", resamples: int = 2000, level: float = 0.95,
                seed: int = 0) -> tuple[int, dict[str, dict[str, dict]]]:
    """The number of scenes, and model -> metric -> compare() against `baseline` (one resample draw for all)."""
    if resamples < 1 or not 0 < level < 1:
        raise SystemExit(f"--resamples {resamples} --level {level}: give at least 1 resample and a level in (0, 1)")
    base = read_records(baseline, run_name)
    base_rows = list(base[1].values())
    idx = resample_indices(len(base_rows), resamples, seed)
    out = {}
    for m in models:
        other = aligned(base, read_records(m, run_name))
        out[m] = {metric: compare(base_rows, other, metric, idx, level) for metric in PARTS}
    return len(base_rows), out


def table(baseline: str, models: list[str], run_name: str = "", resamples: int = 2000, level: float = 0.95,
          seed: int = 0, figure: str = "") -> str:
    """The markdown table main prints: each model's metrics and its differences from `baseline`, with intervals;
    with `figure`, the differences drawn there too."""
    n_scenes, rows = comparisons(baseline, models, run_name, resamples, level, seed)
    pct = f"{level:.0%}"
    lines = [f"Paired bootstrap over {n_scenes} scenes ({resamples} resamples, {pct} percentile intervals); "
             f"differences are model - {baseline}", "",
             "| model | " + " | ".join(f"{m} [{pct}] | {m} - baseline [{pct}]" for m in PARTS) + " |",
             "|---|" + "---|---|" * len(PARTS)]
    for m, cs in rows.items():
        cells = []
        for c in cs.values():
            cells += [f"{c['value']:.3f} [{c['value_ci'][0]:.3f}, {c['value_ci'][1]:.3f}]",
                      f"{c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}]"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if figure:
        lines += ["", f"plotted to {plot(rows, baseline, f'{n_scenes} scenes, {pct} intervals', Path(figure))}"]
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, dict]], baseline: str, what: str, out: Path) -> Path:
    """One panel per metric: each model's difference from the baseline with its interval, and the zero line."""
    plt = pyplot()
    names = list(rows)
    fig, axes = plt.subplots(1, len(PARTS), figsize=(4 * len(PARTS), 1.2 + 0.45 * len(names)), sharey=True)
    for ax, metric in zip(axes, PARTS):
        diffs = [rows[m][metric]["diff"] for m in names]
        lo = [d - rows[m][metric]["diff_ci"][0] for d, m in zip(diffs, names)]
        hi = [rows[m][metric]["diff_ci"][1] - d for d, m in zip(diffs, names)]
        ax.errorbar(diffs, range(len(names)), xerr=[lo, hi], fmt="o", color="black", capsize=3)
        ax.axvline(0.0, color="0.5", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{metric} - baseline ({'lower' if metric.startswith('CHAIR') else 'higher'} is better)")
    axes[0].set_yticks(range(len(names)), [Path(m).name or m for m in names])
    axes[0].invert_yaxis()
    fig.suptitle(f"Differences from {baseline}, paired bootstrap over {what}", fontsize=10)
    return save_figure(fig, out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--baseline", required=True, help="the model each difference is taken from")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--run_name", default="", help="the eval.run_embedded run whose records are read ('' = "
                                                  "eval_embedded.per_question.jsonl)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default="", help="also draw the differences with their intervals to this PNG")
    a = p.parse_args(argv)
    out = table(a.baseline, a.models, a.run_name, a.resamples, a.level, a.seed, a.figure)
    print(out)
    return out


if __name__ == "__main__":
    main()
