"""The step schedule every stage's loop shares: which micro-batches make each optimizer step,
where a resumed run picks up, when a resumable checkpoint is due and when an interrupt stops; and
the bookkeeping after each step (metrics, rates, progress bar, checkpoints)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch


@dataclass
class StepPlan:
    """Optimizer steps per epoch and in all (the data order is fixed by the seed); `shape`: what else fixes the data
    order or steps, checked on resume: the number of samples (the seeded permutation is of all of them: one row added
    to the data kept steps_per_epoch and reordered every step) and a stage's own settings (PPO: prompts per rollout
    batch)."""
    steps_per_epoch: int
    total_steps: int
    shape: dict = field(default_factory=dict)
    unused_per_epoch: int = 0  # samples past the epoch's last whole optimizer step (another draw each epoch)

    @staticmethod
    def make(n: int, micro: int, accum: int, world: int, epochs: float, max_steps: int) -> "StepPlan":
        per_epoch = n // (micro * accum * world)
        if per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one optimizer step ({micro} x {accum} x {world} ranks)")
        return StepPlan(per_epoch, total_steps(per_epoch, epochs, max_steps), shape={"samples": n},
                        unused_per_epoch=n - per_epoch * micro * accum * world)


def batch_plan(n: int, o, world: int) -> StepPlan:
    """StepPlan.make for a stage whose steps are batches of its rows (SFT, reward model, DPO), o: its OptimArgs. Data
    smaller than one step (a user's small file under the default batch size) stopped on a ValueError traceback that
    named no option: refused naming those that set a step's size."""
    micro, accum = o.per_device_train_batch_size, o.gradient_accumulation_steps
    if n < micro * accum * world:
        raise SystemExit(f"{n} samples are fewer than one optimizer step: --per_device_train_batch_size {micro} x "
                         f"--gradient_accumulation_steps {accum} x {world} rank(s); lower them or give more data")
    return StepPlan.make(n, micro, accum, world, o.num_train_epochs, o.max_steps)


def total_steps(per_epoch: int, epochs: float, max_steps: int) -> int:
    """A run's optimizer steps: max_steps when given (> 0), else `epochs` epochs of steps, a part step rounded up
    (transformers' Trainer: ceil(epochs x steps per epoch)). The product is rounded to 9 decimals first: in binary
    0.29 x 100 is 28.999..., and 0.7 x 10 is 7.000000000000001, which ceil() would make 8."""
    return max_steps if max_steps > 0 else max(1, math.ceil(round(per_epoch * epochs, 9)))


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
    exactly where the uninterrupted one would be: the data order, and the random numbers a step draws
    (dropout, LoRA dropout), which are seeded by (seed, step, rank)."""
    end = min(plan.total_steps, stop_after) if stop_after else plan.total_steps
    step = start
    while step < end:
        epoch, k = divmod(step, plan.steps_per_epoch)
        mbs = epoch_micro_batches(n, micro, world, rank, seed, epoch)
        for j in range(k, plan.steps_per_epoch):
            step += 1
            torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)
            yield step, epoch, mbs[j * accum:(j + 1) * accum]
            if step >= end:
                return


def rank_batches(n: int, world: int, rank: int, batch_size: int) -> Iterator[list[int]]:
    """This rank's batches of a pass over n items without updates (held-out scoring, reference log-probs):
    items rank, rank + world, ... Every rank gets the same number of batches, because under ZeRO-3 each
    forward gathers parameters collectively; a rank short of one gets an empty list, on which it runs a
    forward of any item and discards the result."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    for c in range(-(-per_rank // batch_size)):
        yield mine[c * batch_size:(c + 1) * batch_size]


def stand_in_batch(make_batch, n: int, fallback: tuple | None = None):
    """The batch of the first of n items that makes one (not a bad row): what a rank short of a batch
    runs and discards (rank_batches). fallback: (make_batch, n) of other rows to take it from when none of these
    makes one (an evaluation whose held-out rows are all bad: the training rows)."""
    batch = next((b for i in range(n) if (b := make_batch([i])) is not None), None)
    if batch is None and fallback is not None:
        return stand_in_batch(*fallback)
    if batch is None:  # a bare StopIteration before
        raise ValueError(f"none of the {n} rows makes a batch: every one is a bad row (skipped by --skip_bad_rows; "
                         "bad_rows.json names them)")
    return batch


def idle_micro_step(engine, discarded_loss) -> None:
    """The micro-step of a rank whose micro-batch was all bad rows: a forward all the same (ZeRO-3 gathers
    parameters collectively in every forward, so every rank must run as many), its loss times 0, and a
    zero gradient for every trainable parameter. discarded_loss() runs the forward (a stand_in_batch).
    Under ZeRO-3 a parameter outside a forward is an empty placeholder (its gradient would be too, which the
    reduce-scatter refuses): there the stand-in forward alone gives every parameter its (zero) gradient."""
    zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
    zero = 0.0 if zero3 else sum(p.sum() * 0 for p in engine.parameters() if p.requires_grad)
    engine.backward(discarded_loss() * 0 + zero)
    engine.step()


def save_due(step: int, total: int, run) -> bool:
    """A resumable checkpoint after this step: every run.save_steps, and at an interrupt (never at the
    end, where the stage saves its final model instead)."""
    stop = bool(run.stop_after_steps) and step >= run.stop_after_steps
    return step < total and (stop or bool(run.save_steps) and step % run.save_steps == 0)


INTERRUPTED = 75  # a stage's exit status after --stop_after_steps: not finished, continue with --resume


def exit_status(result: dict) -> int:
    """A stage's process exit status: 0 when it finished, INTERRUPTED when it stopped early (so that
    run_pipeline.sh does not take an interrupted stage for a finished one)."""
    return INTERRUPTED if result.get("interrupted") else 0


def stopped_early(strategy, report, out, history: list, run, logger=None) -> dict:
    """What a stage returns when --stop_after_steps stopped it: its bad-row report so far written (the resumed run
    adds to it) and a line saying how to continue; exit_status turns it into INTERRUPTED."""
    if logger is not None:
        logger.close()
    strategy.write_report(report, out)
    if strategy.is_main:
        print(f"stopped after {run.stop_after_steps} steps; continue with --resume")
    return {"history": history, "output_dir": str(out), "interrupted": True}


def run_stage(main) -> None:
    """A stage's `__main__`: runs `main()` and exits with its status. A rank that stops on an error exit
    (SystemExit with a message or a non-zero code, as the stages raise on bad input) leaves at once: without
    this its exit handler waited up to two minutes for ranks that were waiting for it. A data file's error (its
    format, a bad row) is that message alone, as the stages' own refusals are, without a Python traceback."""
    from training.data.bad_rows import BadRowError
    from training.data.readers import DataFormatError
    from training.engine.distributed import note_failed_exit
    try:
        result = main()
    except SystemExit as e:
        if e.code not in (None, 0, INTERRUPTED):
            note_failed_exit()
        raise
    except (DataFormatError, BadRowError) as e:  # the data's fault, named in the message: no traceback
        note_failed_exit()
        raise SystemExit(f"error: {e}") from None
    raise SystemExit(exit_status(result))


def clear_earlier_run(strategy, out: Path) -> None:
    """A run that starts from step 0 removes an earlier run's resumable checkpoints and tensorboard events
    in its output directory: their rotation would delete this run's checkpoints, a later --resume would
    load them, and tensorboard would draw both runs as one. It removes the earlier run's final model too
    (weights, adapters), unless this run reads an input from that folder: stopped early, the folder would
    otherwise pair this run's config and metrics with the old run's weights, which a later stage loads."""
    if strategy.is_main:
        import shutil

        from training.model.builder import remove_paths, saved_model_files
        for name in ("checkpoints", "tensorboard"):
            old = out / name
            if old.is_dir() and any(old.iterdir()):
                print(f"a fresh run (nothing to resume): removing the earlier run's {old}")
                shutil.rmtree(old)
        (out / "bad_rows.json").unlink(missing_ok=True)  # this run writes its own (Strategy.write_report)
        final = saved_model_files(out) + [p for p in (out / "value_head.safetensors", out / "reward_model.json")
                                          if p.exists()]
        if final and not _reads_from(out):
            print(f"a fresh run: removing the earlier run's model in {out} ({', '.join(p.name for p in final)})")
            remove_paths(final)
    strategy.barrier()


def _reads_from(out: Path) -> bool:
    """Whether this run's config (out/run_config.json, written before training) names out itself as an input."""
    import json
    try:
        cfg = json.loads((out / "run_config.json").read_text())
    except (OSError, ValueError):
        return True  # unknown: keep what is there
    here = out.resolve()
    return any(isinstance(v, str) and v and k != "output_dir" and Path(v).resolve() == here
               for section in cfg.values() if isinstance(section, dict) for k, v in section.items())


def run_shape(strategy, plan: StepPlan) -> dict:
    """What fixes a run's data order and steps: a resumed run must have the checkpoint's, or it would not continue
    the same run (another data order, another number of samples per step)."""
    o = strategy.optim
    return {"world_size": strategy.world_size, "per_device_train_batch_size": o.per_device_train_batch_size,
            "gradient_accumulation_steps": o.gradient_accumulation_steps, "seed": o.seed,
            "steps_per_epoch": plan.steps_per_epoch, **plan.shape}


# options a resumed run may change: how it is watched, logged, saved or evaluated, and what only costs memory or time
FREE_ON_RESUME = {("data", "eval_data_path"), ("data", "encoded_cache_mb"), ("optim", "per_device_eval_batch_size"),
                  ("ds", "local_rank"), ("model", "gradient_checkpointing"), ("ppo", "gather_for_generation"),
                  ("dpo", "ref_cache_dir"), ("dpo", "precompute_ref"), ("dpo", "fast_path"),
                  ("rm", "fast_path"),
                  ("data", "skip_bad_rows")}  # the last: the remedy after a run stopped on a bad row


def run_settings(cfg: dict) -> dict:
    """The options a resumed run must share with its checkpoint ("concept.option" -> value): all but RunArgs'
    and FREE_ON_RESUME, and what a --deepspeed_config file holds (by its path alone, the file edited between the
    interrupt and the resume went unnoticed)."""
    import dataclasses

    from training.files import file_sha256
    out = {f"{concept}.{k}": v for concept, args in cfg.items() if concept != "run"
           for k, v in dataclasses.asdict(args).items() if (concept, k) not in FREE_ON_RESUME}
    ds_file = getattr(cfg.get("ds"), "deepspeed_config", "")
    if ds_file and Path(ds_file).is_file():
        out["ds.deepspeed_config (its text's sha256)"] = file_sha256(ds_file)[:16]
    return out


def check_run_settings(saved: dict | None, now: dict, ckpt: Path) -> None:
    """Refuse a resume with options other than the checkpoint's: DeepSpeed would restore the old optimizer and
    schedule under the new ones (a new --learning_rate ignored), another loss or data would continue the run
    as another. A checkpoint without settings (written before they were kept) is not checked."""
    diff = [f"--{k.split('.', 1)[1]} {v!r} in the checkpoint, {now[k]!r} now" for k, v in (saved or {}).items()
            if k in now and now[k] != v]
    if diff:
        raise SystemExit(f"--resume: {ckpt} was written with other options ({'; '.join(diff)}): resume with the "
                         "checkpoint's (its run's run_config.json beside it), or start afresh without --resume")


def check_run_shape(saved: dict | None, now: dict, ckpt: Path) -> None:
    """Refuse a resume whose shape differs from the checkpoint's (a checkpoint without one is not checked)."""
    diff = {k: (v, now.get(k)) for k, v in (saved or {}).items() if now.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
        raise SystemExit(f"--resume: {ckpt} was written by a run of another shape ({what}; samples and "
                         "steps_per_epoch follow the data's size): resume with the same settings and data, or start "
                         "afresh without --resume")


def finish_interrupted_commit(strategy, ckpt: Path, names: list[str]) -> None:
    """Strategy.save_resume names a new step in each engine's `latest`, one after another, once every engine's
    checkpoint of it is written on every rank (its run.json the last file): a run killed between two `latest` files
    left them naming different steps. The newest step named is then complete for every engine: the other `latest`
    files are pointed at it, as the kill kept them from being. Anything else is left for the checks that follow."""
    if len(names) < 2:
        return
    from training.engine.checkpoints import RUN_RECORD
    from training.files import write_text_atomic
    latest = {name: ckpt / name / "latest" for name in names}
    tags = {latest[n].read_text().strip() for n in names if latest[n].is_file()}
    newest = max(tags, key=lambda t: int(t[4:]) if t.startswith("step") and t[4:].isdigit() else -1, default="")
    complete = newest and all((ckpt / n / newest / RUN_RECORD).is_file() for n in names)
    if strategy.is_main and complete and len(tags) + sum(not p.is_file() for p in latest.values()) > 1:
        print(f"--resume: the run stopped as it named checkpoint {newest} (written for every engine): finishing that")
        for p in latest.values():
            write_text_atomic(p, newest)
    strategy.barrier()  # every rank reads `latest` after it


def open_run(strategy, engine, cfg: dict, plan: StepPlan, desc: str, postfix: dict[str, tuple[str, str]],
             state=None, report=None):
    """What every stage's loop opens with: -> (first step, its StepLog). With --resume the engines are
    restored from the last resumable checkpoint (refused for another shape or other options) and the metrics
    file continues. cfg: the stage's options by concept; written to output_dir/run_config.json once the run
    is known to start or continue (a refused resume leaves the checkpoint's there).

    engine: a DeepSpeed engine, or {name: engine} for a stage with several (PPO: actor and critic), each
    checkpointed under checkpoints/<name>. state: what a resumed run must restore besides the engines,
    with state_dict() / load_state_dict() (PPO: its KL controller and reward statistics); it travels
    in the checkpoints' client state. report: the run's BadRowReport, written with every resumable checkpoint
    (a run killed after it then resumed still lists the rows found before it)."""
    from training.config import save_config
    from training.engine.metrics import MetricsLogger

    run = cfg["run"]
    out = Path(run.output_dir)
    engines = engine if isinstance(engine, dict) else {"": engine}
    ckpt = out / "checkpoints"
    saved = None
    if run.resume:
        from training.engine.checkpoints import saved_run_record
        finish_interrupted_commit(strategy, ckpt, list(engines))
        for name in engines:  # before DeepSpeed loads: another ZeRO stage or world size fails inside it obscurely
            record = saved_run_record(ckpt / name)
            latest = ckpt / name / "latest"  # (naming a checkpoint that is not there: load_resume says so)
            if record is None and latest.is_file() and (ckpt / name / latest.read_text().strip()).is_dir():
                raise SystemExit(f"--resume: {ckpt / name} was written by an earlier version of this project (no "
                                 f"run.json): its optimizer state has another layout (one parameter group, before "
                                 "weight decay spared biases and norms); start afresh without --resume")
            record = record or {}
            check_run_shape(record.get("shape"), run_shape(strategy, plan), ckpt)
            check_run_settings(record.get("settings"), run_settings(cfg), ckpt)
        got = {name: strategy.load_resume(e, ckpt / name) for name, e in engines.items()}
        steps = {name: g["step"] if g else None for name, g in got.items()}
        if len(set(steps.values())) > 1:  # e.g. a run killed between writing the actor's and the critic's
            raise SystemExit(f"--resume: the checkpoints under {ckpt} are of different steps ({steps}); delete "
                             "the newer ones (each engine's `latest` names its step) to resume from a common step")
        saved = next(iter(got.values()))
        if saved:
            check_run_shape(saved.get("shape"), run_shape(strategy, plan), ckpt)
            check_run_settings(saved.get("settings"), run_settings(cfg), ckpt)
    if saved and state is not None:
        state.load_state_dict(saved)
    step = saved["step"] if saved else 0
    if saved and run.stop_after_steps and run.stop_after_steps <= step:  # it trained nothing and said "interrupted"
        raise SystemExit(f"--stop_after_steps {run.stop_after_steps}: the checkpoint resumed is at step {step} "
                         "already; give a later step to stop after, or none")
    if run.resume and not saved:
        from training.model.builder import saved_model_files
        if saved_model_files(out):  # a finished run: retraining would replace its model
            raise SystemExit(f"--resume: {out} holds a finished run's model and no checkpoint to resume from; run "
                             "without --resume to train it afresh (which replaces that model)")
        if strategy.is_main:  # (a job requeued with --resume always on starts so; said, not silent)
            print(f"--resume: no checkpoint under {ckpt} yet: training from the start")
    if strategy.is_main:
        save_config(cfg, out / "run_config.json")
        if plan.unused_per_epoch:  # nothing left out without a word
            print(f"{desc}: each epoch trains on whole optimizer steps: {plan.unused_per_epoch} samples are left "
                  "out of each one (another draw each epoch, the order being reshuffled)")
    if not saved:
        clear_earlier_run(strategy, out)
    logger = MetricsLogger(out, strategy.is_main, resume_step=step if saved else None)
    bar = None
    if strategy.is_main and run.progress:
        from tqdm import tqdm
        bar = tqdm(total=plan.total_steps, initial=step, desc=desc, dynamic_ncols=True)
    return step, StepLog(strategy, engines, run, plan, ckpt, logger, bar, postfix, state, run_settings(cfg), report,
                         window=saved.get("window") if saved else None)


def loss_scaling(engine) -> dict:
    """fp16: the dynamic loss scale and the optimizer steps skipped so far for overflowing gradients (DeepSpeed
    steps neither the weights nor the learning-rate schedule then, so a run with many skips lags its schedule)."""
    opt = getattr(engine, "optimizer", None)
    scale = getattr(getattr(opt, "loss_scale_config", None), "cur_scale", getattr(opt, "cur_scale", None))
    out = {"skipped_steps": int(getattr(engine, "skipped_steps", 0))}
    return out if scale is None else {"loss_scale": float(scale), **out}


CURRENT_VALUES = ("lr", "kl_coef")  # settings a step runs with, logged as the logged step's, never averaged


class StepLog:
    """What every stage's loop does after an optimizer step. Amounts counted since the last logged step
    become per-second rates in that step's metrics, with the epoch; metrics are logged every
    run.logging_steps and at the last step, and kept in `history`; the progress bar advances showing
    `postfix` (label -> (metric key, format), read from this step's metrics or else the last logged
    ones); a resumable checkpoint is written when due.

    A logged row holds each numeric metric's mean over the steps since the last logged one that report it (as
    transformers' Trainer and TRL log them; PPO's critic warm-up steps report no policy loss), but the settings in
    CURRENT_VALUES (the learning rate, PPO's KL coefficient), which are the logged step's. The window (metric ->
    [sum, steps reporting it]) travels in the checkpoints, so a resumed run logs what an uninterrupted one does."""

    def __init__(self, strategy, engines: dict, run, plan: StepPlan, ckpt: Path, logger, bar, postfix, state=None,
                 settings: dict | None = None, report=None, window: dict | None = None):
        self.strategy, self.engines, self.run, self.plan, self.settings = strategy, engines, run, plan, settings
        self.report = report
        self.ckpt, self.logger, self.bar, self.postfix, self.state = ckpt, logger, bar, postfix, state
        self.history: list[dict] = []
        self._t0, self._since = time.time(), {}
        self._window = _window_copy(window or {})

    def _mean_over_window(self, m: dict) -> dict:
        """Adds this step's numeric metrics to the window (metric -> [sum, steps reporting it]); returns m with each
        replaced by its mean over the window's steps that report it."""
        w = self._window
        for k, v in m.items():
            if k not in CURRENT_VALUES and isinstance(v, (int, float)) and not isinstance(v, bool):
                total, count = w.get(k, (0.0, 0))
                w[k] = [total + float(v), count + 1]
        return {k: (w[k][0] / w[k][1] if k in w else v) for k, v in m.items()}

    def due(self, step: int) -> bool:
        return step % self.run.logging_steps == 0 or step == self.plan.total_steps

    def after(self, step: int, m: dict, rates: dict[str, float], evaluate=None) -> None:
        """rates: rate name -> amount done this step (e.g. {"pairs_per_s": 16}); evaluate: a function
        returning held-out metrics, called every run.eval_steps steps before the last (after the last the
        stage evaluates its saved model itself) and logged with this step's row when that is logged, else
        on its own; its time is not in the rates, nor is a resumable checkpoint's."""
        for k, v in rates.items():
            self._since[k] = self._since.get(k, 0.0) + v
        shown_now = dict(m)
        m = self._mean_over_window(m)
        held_out = evaluate is not None and bool(self.run.eval_steps) and step % self.run.eval_steps == 0 \
            and step < self.plan.total_steps
        if held_out and not self.due(step):
            t = time.time()
            self.logger.log(step, evaluate())
            self._t0 += time.time() - t
        if self.due(step):
            dt = max(time.time() - self._t0, 1e-9)
            m.update(epoch=step / self.plan.steps_per_epoch, **{k: v / dt for k, v in self._since.items()})
            if self.strategy.precision == "fp16":
                for name, engine in self.engines.items():
                    m.update({f"{name}/{k}" if name else k: v for k, v in loss_scaling(engine).items()})
            m.update(evaluate() if held_out else {})
            self.logger.log(step, m)
            self.history.append({"step": step, **m})
            self._t0, self._since, self._window = time.time(), {}, {}
        if self.bar:
            shown = {**(self.history[-1] if self.history else {}), **shown_now}
            self.bar.update(1)
            self.bar.set_postfix({label: fmt.format(shown[key]) for label, (key, fmt) in self.postfix.items()
                                  if key in shown})
        if save_due(step, self.plan.total_steps, self.run):  # its time is not in the rates either, as evaluations'
            t = time.time()
            if self.report is not None:  # the rows found so far, before the checkpoint a resumed run starts after
                self.strategy.write_report(self.report, self.run.output_dir)
            client = {"step": step, "shape": run_shape(self.strategy, self.plan), "settings": self.settings,
                      "window": _window_copy(self._window),
                      **(self.state.state_dict() if self.state is not None else {})}
            self.strategy.save_resume({self.ckpt / name: engine for name, engine in self.engines.items()}, step,
                                      client, self.run.save_total_limit)
            self._t0 += time.time() - t

    def close(self, keep_logger: bool = False) -> None:
        """keep_logger: the stage logs more after the loop (the RM's final evaluation) and closes it."""
        if self.bar:
            self.bar.close()
        if not keep_logger:
            self.logger.close()


def _window_copy(window: dict) -> dict:
    return {k: list(v) for k, v in window.items()}
