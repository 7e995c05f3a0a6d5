"""The DPO family's metric panels (plotted by training.engine.plots)."""
from __future__ import annotations

from pathlib import Path

from training.engine import plots

PANELS = [("loss", ["loss", "eval/loss"]), ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
          ("reward accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]), ("log-probs", ["logps/chosen", "logps/rejected"]),
          ("ORPO", ["nll_loss", "log_odds_ratio", "log_odds_chosen"])]


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    return plots.plot_metrics(metrics_path, out_png, title, PANELS)
