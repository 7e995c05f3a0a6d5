"""Metrics: one JSON object per logged step in metrics.jsonl, mirrored to tensorboard (rank 0 only)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from training.files import write_text_atomic


class MetricsLogger:
    """resume_step: the step a resumed run restarts after; rows logged after it by the interrupted run
    (past its last checkpoint) are dropped from metrics.jsonl and tensorboard, so no step appears twice.
    None: a fresh run, which starts a new metrics.jsonl."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None and self.path.exists():
                self.path.unlink()
            elif self.path.exists():
                kept = [x for x in _rows(self.path) if json.loads(x)["step"] <= resume_step]
                write_text_atomic(self.path, "".join(x + "\n" for x in kept))
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _num(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _rows(path: Path) -> list[str]:
    """metrics.jsonl's rows; a last row cut short (the run killed as it wrote it, so after its last checkpoint)
    is dropped, a bad row before it is an error naming the file and line."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    for i, x in enumerate(lines):
        try:
            json.loads(x)["step"]
        except (ValueError, KeyError, TypeError) as err:
            if i == len(lines) - 1:
                print(f"{path}: line {i + 1} was cut short as the run stopped; dropped")
                return lines[:i]
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({err}): mend or delete the file") from None
    return lines


def _num(v):
    try:
        return float(v.item()) if hasattr(v, "item") else v
    except (ValueError, RuntimeError):
        return v


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
