"""The step schedule every stage's loop shares: which micro-batches make each optimizer step,
where a resumed run picks up, when a resumable checkpoint is due and when an interrupt stops."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass
class StepPlan:
    """Optimizer steps per epoch and in all (the data order is fixed by the seed)."""
    steps_per_epoch: int
    total_steps: int

    @staticmethod
    def make(n: int, micro: int, accum: int, world: int, epochs: float, max_steps: int) -> "StepPlan":
        per_epoch = n // (micro * accum * world)
        if per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one optimizer step ({micro} x {accum} x {world} ranks)")
        total = max_steps if max_steps > 0 else max(1, int(per_epoch * epochs))
        return StepPlan(per_epoch, total)


def epoch_micro_batches(n: int, micro: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation, interleaved across ranks."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    usable = n - n % (micro * world)
    mine = perm[:usable][rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def planned_steps(plan: StepPlan, start: int, n: int, micro: int, accum: int, world: int, rank: int,
                  seed: int, stop_after: int = 0) -> Iterator[tuple[int, int, list[list[int]]]]:
    """Yield (step, epoch, this step's micro-batch index lists) for the steps after `start`, up to the
    end of the plan or `stop_after` (an interrupt), whichever comes first. A resumed run continues
    exactly where the uninterrupted one would be."""
    end = min(plan.total_steps, stop_after) if stop_after else plan.total_steps
    step = start
    while step < end:
        epoch, k = divmod(step, plan.steps_per_epoch)
        mbs = epoch_micro_batches(n, micro, world, rank, seed, epoch)
        for j in range(k, plan.steps_per_epoch):
            step += 1
            yield step, epoch, mbs[j * accum:(j + 1) * accum]
            if step >= end:
                return


def save_due(step: int, total: int, run) -> bool:
    """A resumable checkpoint after this step: every run.save_steps, and at an interrupt (never at the
    end, where the stage saves its final model instead)."""
    stop = bool(run.stop_after_steps) and step >= run.stop_after_steps
    return step < total and (stop or bool(run.save_steps) and step % run.save_steps == 0)


def open_run(strategy, engine, run, total_steps: int, desc: str):
    """What every stage's loop opens with: -> (checkpoint dir, first step, metrics logger, progress bar
    or None). With --resume the engine is restored from the last resumable checkpoint."""
    from training.engine.metrics import MetricsLogger

    out = Path(run.output_dir)
    ckpt = out / "checkpoints"
    state = strategy.load_resume(engine, ckpt) if run.resume else None
    step = state["step"] if state else 0
    logger = MetricsLogger(out, strategy.is_main, resume=bool(state))
    bar = None
    if strategy.is_main and run.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=desc, dynamic_ncols=True)
    return ckpt, step, logger, bar
