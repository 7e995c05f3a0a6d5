"""Plot a run's metrics.jsonl as a row of panels to a PNG (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from training.engine.metrics import read_metrics


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported only where a figure is drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str | Path, dpi: int = 100) -> Path:
    """Lay the figure out, write it to `out` (its folder made) and close it."""
    out = Path(out)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str,
                 panels: list[tuple[str, list[str]]]) -> Path | None:
    """panels: [(panel title, [metric keys])]; keys absent from the run are left out."""
    plt = pyplot()
    rows = read_metrics(metrics_path)
    panels = [(t, [k for k in keys if any(k in r for r in rows)]) for t, keys in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    if not rows or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (t, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k,  # a few points (evaluations): marked,
                    marker="o" if len(pts) <= 20 else None, markersize=4)  # one alone draws no line
        ax.set_title(t)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, out_png, dpi=90)
