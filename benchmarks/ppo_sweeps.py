"""PPO's validation sweeps as a table and a picture: every setting's seeds and mean on the CHAIR_i / recall plane.

    python -m benchmarks.ppo_sweeps            # benchmarks/ppo_sweeps.csv -> table + figure/ppo_validation_sweeps.png

The rows (benchmarks/ppo_sweeps.csv: sweep, setting, seed, chair_i, recall) are the validation-world runs written
up in benchmarks/results_history.md ("PPO sweeps"): each a `bash run_ppo_training.sh ... --seed S` scored with
`python -m eval.run_embedded --world <validation world> --benches objhal`. The table applies the rule that chose
the defaults: among the settings run with at least --min_seeds seeds whose mean CHAIR_i is at most --chair_factor x
SFT's, the highest mean recall. It also counts the seeds inside both targets (CHAIR_i at most --chair_factor x SFT's,
recall at least SFT's minus --max_recall_drop).
"""
from __future__ import annotations

import argparse
import csv
import statistics as st
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("sweep", "setting", "seed", "chair_i", "recall")


@dataclass
class Setting:
    name: str
    sweep: int
    seeds: list[int] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)  # (chair_i, recall) per seed

    @property
    def mean(self) -> tuple[float, float]:
        return st.mean(c for c, _ in self.points), st.mean(r for _, r in self.points)


def read_sweeps(path: str | Path) -> list[Setting]:
    """The settings in file order; a bad row is an error naming the file, line and field."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        header = tuple(rows[0].keys()) if rows else ()
    if header != FIELDS:
        raise ValueError(f"{path}: the header must be {','.join(FIELDS)}, not {','.join(header) or 'empty'}")
    settings: dict[str, Setting] = {}
    for line, row in enumerate(rows, start=2):
        def number(key, kind, lo=None, hi=None):
            try:
                v = kind(row[key])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {line}, field {key}: {row[key]!r} is not a {kind.__name__}") from None
            if lo is not None and not lo <= v <= hi:
                raise ValueError(f"{path}: line {line}, field {key}: {v} is outside [{lo}, {hi}]")
            return v
        if not (row["setting"] or "").strip():
            raise ValueError(f"{path}: line {line}, field setting: empty")
        sweep, seed = number("sweep", int), number("seed", int)
        point = number("chair_i", float, 0.0, 1.0), number("recall", float, 0.0, 1.0)
        s = settings.setdefault(row["setting"], Setting(row["setting"], sweep))
        if seed in s.seeds:
            raise ValueError(f"{path}: line {line}, field seed: seed {seed} of {row['setting']!r} is there twice")
        s.seeds.append(seed)
        s.points.append(point)
    return list(settings.values())


def choose(settings: list[Setting], sft_chair: float, chair_factor: float, min_seeds: int) -> Setting | None:
    """The rule: the highest mean recall among settings with >= min_seeds seeds and mean CHAIR_i <= factor x SFT's."""
    ok = [s for s in settings if len(s.points) >= min_seeds and s.mean[0] <= chair_factor * sft_chair]
    return max(ok, key=lambda s: s.mean[1], default=None)


def table(settings: list[Setting], sft: tuple[float, float], chair_factor: float, max_drop: float,
          chosen: Setting | None) -> str:
    chair_max, recall_min = chair_factor * sft[0], sft[1] - max_drop
    lines = [f"SFT {sft[0]:.3f} / {sft[1]:.3f}: targets CHAIR_i <= {chair_max:.4f}, recall >= {recall_min:.3f}", "",
             "| sweep | setting | seeds | mean CHAIR_i | mean recall | seeds in both targets |", "|---|---|---|---|---|---|"]
    for s in settings:
        c, r = s.mean
        inside = sum(ci <= chair_max and ri >= recall_min for ci, ri in s.points)
        mark = " **(rule's choice)**" if s is chosen else ""
        lines.append(f"| {s.sweep} | {s.name}{mark} | {len(s.points)} | {c:.3f} | {r:.3f} | {inside} of {len(s.points)} |")
    return "\n".join(lines)


def plot(settings: list[Setting], sft: tuple[float, float], chair_factor: float, max_drop: float, out: Path) -> Path:
    from training.engine.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    chair_max, recall_min = chair_factor * sft[0], sft[1] - max_drop
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((recall_min, 0.0), 1.0 - recall_min, chair_max, color="0.9", zorder=0))  # both targets
    ax.axhline(chair_max, color="0.5", linestyle="--", linewidth=1)
    ax.axvline(recall_min, color="0.5", linestyle="--", linewidth=1)
    cmap = plt.get_cmap("tab20")
    for i, s in enumerate(settings):
        colour = cmap(i % 20)
        ax.scatter([r for _, r in s.points], [c for c, _ in s.points], s=14, color=colour, alpha=0.6)
        c, r = s.mean
        ax.scatter([r], [c], s=70, color=colour, edgecolor="black", label=f"{s.sweep}: {s.name} (n={len(s.points)})")
    ax.scatter([sft[1]], [sft[0]], marker="*", s=200, color="black", label="SFT")
    recalls = [r for s in settings for _, r in s.points] + [sft[1], recall_min]
    chairs = [c for s in settings for c, _ in s.points] + [sft[0], chair_max]
    ax.set_xlim(min(recalls) - 0.01, max(recalls) + 0.01)
    ax.set_ylim(0.0, max(chairs) * 1.08)
    ax.set_xlabel("object recall (higher is better)")
    ax.set_ylabel("CHAIR_i (lower is better)")
    ax.set_title("PPO on the validation world: seeds (small) and means (large);\n"
                 f"both targets (shaded): CHAIR_i <= {chair_factor:g} x SFT's, recall >= SFT's - {max_drop:g}")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "ppo_sweeps.csv"))
    p.add_argument("--sft", type=float, nargs=2, default=(0.109, 0.948), metavar=("CHAIR_I", "RECALL"),
                   help="the SFT model's figures on the same world (the validation world's by default)")
    p.add_argument("--chair_factor", type=float, default=0.5)
    p.add_argument("--max_recall_drop", type=float, default=0.03)
    p.add_argument("--min_seeds", type=int, default=3)
    p.add_argument("--out", default="figure/ppo_validation_sweeps.png")
    a = p.parse_args(argv)
    settings = read_sweeps(a.csv)
    if not settings:
        raise SystemExit(f"{a.csv} holds no runs")
    chosen = choose(settings, a.sft[0], a.chair_factor, a.min_seeds)
    print(table(settings, tuple(a.sft), a.chair_factor, a.max_recall_drop, chosen))
    png = plot(settings, tuple(a.sft), a.chair_factor, a.max_recall_drop, Path(a.out))
    print(f"\nplotted to {png}")
    return {"settings": settings, "chosen": chosen, "png": png}


if __name__ == "__main__":
    main()
