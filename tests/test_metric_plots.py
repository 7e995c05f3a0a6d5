"""Each stage's figure/ plot draws every metric its stage is asked to log (a metric in metrics.jsonl and
tensorboard but in no panel was missing from the figure)."""
import json

import pytest

# what the issues ask each stage to log, and so to draw
REQUIRED = {
    "dpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"],
    "orpo": ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
             "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"],
    "ppo": ["reward/mean", "reward/std", "kl", "entropy", "clipfrac", "value_loss", "explained_variance",
            "response_length", "gen_tokens_per_s", "train_tokens_per_s"],
    "rm": ["loss", "accuracy", "eval/accuracy"],
}


def _drawn(monkeypatch, tmp_path, plot, keys) -> set[str]:
    """The labels of the lines `plot(metrics_path, png)` draws for a run that logged `keys` at steps 1 and 2."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **{k: 0.5 * s for k in keys}}) + "\n" for s in (1, 2)))
    labels, real = [], Axes.plot

    def record(self, *a, **k):
        labels.append(k.get("label"))
        return real(self, *a, **k)

    monkeypatch.setattr(Axes, "plot", record)
    assert plot(path, tmp_path / "fig.png") is not None
    return set(labels)


@pytest.mark.parametrize("stage", sorted(REQUIRED))
def test_each_stage_plot_draws_every_required_metric(stage, monkeypatch, tmp_path):
    from training.engine.plots import plot_metrics
    if stage in ("dpo", "orpo"):
        from training.dpo.plots import plot_metrics as plot
    else:
        import importlib
        panels = importlib.import_module(f"training.{stage}.main").PANELS

        def plot(path, png):
            return plot_metrics(path, png, stage, panels)
    missing = set(REQUIRED[stage]) - _drawn(monkeypatch, tmp_path, plot, REQUIRED[stage])
    assert not missing, f"{stage}'s figure leaves out {sorted(missing)}"
