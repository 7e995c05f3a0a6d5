"""Resumable checkpoints' files: the run record beside each, rotation, loading that unpickles no code, and what a
LoRA / QLoRA model's checkpoint holds (its trained weights only)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

RUN_RECORD = "run.json"  # in each resumable checkpoint: the run's shape and options, readable without loading it


def saved_run_record(ckpt_root: str | Path) -> dict | None:
    """The shape and options the newest resumable checkpoint under ckpt_root was written with (None: none, or one
    written before they were recorded)."""
    latest = Path(ckpt_root) / "latest"
    if not latest.is_file():
        return None
    record = Path(ckpt_root) / latest.read_text().strip() / RUN_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def rotate_checkpoints(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (all with keep <= 0) and none after it."""
    import shutil
    tags = sorted((p for p in root.glob("step*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    later = [p for p in tags if int(p.name[4:]) > step]
    upto = [p for p in tags if int(p.name[4:]) <= step]
    for old in later + (upto[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (DeepSpeed's checkpoint loading asks for weights_only=False) unpickles
    tensors and plain containers only, plus the few DeepSpeed classes its checkpoints hold: a checkpoint
    folder from elsewhere cannot run code on --resume."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    real = torch.load

    def load(*args, **kwargs):
        return real(*args, **{**kwargs, "weights_only": True})
    torch.load = load
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = real


def _adapters(engine) -> bool:
    """Whether the engine trains a peft (LoRA / QLoRA) model, or one inside (a reward model's or critic's backbone)."""
    return any(hasattr(m, "peft_config") for m in getattr(engine, "module", engine).modules())


def _load_trained(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module loading for a checkpoint of trained weights only (training.engine.strategy.save_resume):
    every trained parameter of `dst` must be in `src`."""
    trained = [n for n, p in dst.named_parameters() if p.requires_grad]
    missing = [n for n in trained if n not in src]
    if missing:
        raise SystemExit(f"--resume: the checkpoint lacks {len(missing)} trained weights of this model (such as "
                         f"{missing[0]}): it was written for another model or LoRA setting; start afresh without "
                         "--resume")
    dst.load_state_dict({n: src[n] for n in trained}, strict=False)
