"""StepLog: the bookkeeping after each optimizer step that the SFT, RM and DPO loops share."""
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.engine import loop
from training.config import RunArgs
from training.engine.loop import StepLog, StepPlan


class Recorder:
    def __init__(self):
        from training.config import OptimArgs

        self.logged, self.saved, self.closed = [], [], False
        self.optim, self.world_size = OptimArgs(), 1  # what a run's shape is read from
        self.precision = "fp32"

    def log(self, step, m):
        self.logged.append((step, dict(m)))

    def close(self):
        self.closed = True

    def save_resume(self, engines, step, state, limit):
        self.saved.append(step)
        self.written = getattr(self, "written", []) + [(e, str(ckpt), dict(state)) for ckpt, e in engines.items()]

    def barrier(self):
        pass


def make(logging_steps=2, save_steps=3, total=7, eval_steps=0):
    rec = Recorder()
    run = SimpleNamespace(logging_steps=logging_steps, save_steps=save_steps, stop_after_steps=0, save_total_limit=1,
                          eval_steps=eval_steps)
    return rec, StepLog(rec, {"": None}, run, StepPlan(4, total), Path("ck"), rec, None, {})


def test_rates_are_amounts_since_last_log_over_elapsed_time(monkeypatch):
    # start, log at step 2, its reset, the checkpoint at step 3 (begun and done: no time), log at step 4, its reset
    clock = iter([0.0, 2.0, 6.0, 7.0, 7.0, 9.0, 10.0])
    monkeypatch.setattr(loop.time, "time", lambda: next(clock))
    rec, log = make(total=4)
    for step, pairs in zip(range(1, 5), (8, 8, 4, 4)):
        log.after(step, {"loss": float(step)}, {"pairs_per_s": pairs})
    assert [s for s, _ in rec.logged] == [2, 4]
    assert rec.logged[0][1]["pairs_per_s"] == 16 / 2.0  # 8 + 8 pairs in 2 s
    assert rec.logged[1][1]["pairs_per_s"] == 8 / 3.0  # 4 + 4 pairs in 9 - 6 s
    assert rec.logged[1][1]["epoch"] == 1.0  # 4 steps of a 4-step epoch
    assert [h["step"] for h in log.history] == [2, 4]


def test_last_step_is_logged_evaluations_every_eval_steps_and_checkpoints_when_due():
    rec, log = make(logging_steps=2, save_steps=3, total=7, eval_steps=3)
    calls = []
    for step in range(1, 8):
        log.after(step, {"loss": 0.0}, {}, evaluate=lambda: calls.append(step) or {"eval/loss": 1.5})
    # every 2nd step and the last; evaluations at 3 (a row of its own) and 6 (in the step's row), not at the
    # last step (the stage evaluates its saved model after the loop)
    assert [s for s, _ in rec.logged] == [2, 3, 4, 6, 7]
    assert calls == [3, 6] and [s for s, m in rec.logged if "eval/loss" in m] == [3, 6]
    assert "loss" not in rec.logged[1][1] and rec.logged[3][1]["loss"] == 0.0
    rec2, log2 = make(logging_steps=2, save_steps=3, total=7, eval_steps=0)  # 0: only after the loop
    for step in range(1, 8):
        log2.after(step, {"loss": 0.0}, {}, evaluate=lambda: calls.append(step) or {})
    assert calls == [3, 6]
    assert rec.saved == [3, 6]  # every save_steps, never at the end (the stage saves its final model)
    log.close(keep_logger=True)
    assert not rec.closed
    log.close()
    assert rec.closed


def test_fp16_runs_log_each_engines_loss_scale_and_skipped_steps():
    """DeepSpeed skips the optimizer step (and the learning-rate schedule) on overflowing fp16 gradients; a run
    that skipped many lagged its schedule without a trace in its metrics."""
    rec = Recorder()
    rec.precision = "fp16"
    actor = SimpleNamespace(optimizer=SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=2.0 ** 14)),
                            skipped_steps=3)
    critic = SimpleNamespace(optimizer=SimpleNamespace(cur_scale=512.0), skipped_steps=0)  # older optimizers
    run = SimpleNamespace(logging_steps=1, save_steps=0, stop_after_steps=0, save_total_limit=1, eval_steps=0)
    log = StepLog(rec, {"actor": actor, "critic": critic}, run, StepPlan(4, 4), Path("ck"), rec, None, {})
    log.after(1, {"loss": 1.0}, {})
    m = rec.logged[0][1]
    assert (m["actor/loss_scale"], m["actor/skipped_steps"]) == (16384.0, 3)
    assert (m["critic/loss_scale"], m["critic/skipped_steps"]) == (512.0, 0)
    rec.logged.clear()
    StepLog(rec, {"": actor}, run, StepPlan(4, 4), Path("ck"), rec, None, {}).after(1, {"loss": 1.0}, {})
    assert rec.logged[0][1]["loss_scale"] == 16384.0
    _, plain = make(logging_steps=1)
    plain.after(1, {"loss": 1.0}, {})  # fp32: nothing of the kind
    assert not any("scale" in k or "skipped" in k for k in plain.strategy.logged[0][1])


class State:
    """A stage's extra resume state (PPO: KL coefficient and reward statistics)."""

    def __init__(self, kl):
        self.kl = kl

    def state_dict(self):
        return {"kl_coef": self.kl}

    def load_state_dict(self, d):
        self.kl = d["kl_coef"]


class Resumer(Recorder):
    """A strategy whose checkpoints are kept in a dict: ckpt dir -> client state."""

    def __init__(self):
        super().__init__()
        self.store, self.is_main = {}, False

    def save_resume(self, engines, step, state, limit):
        super().save_resume(engines, step, state, limit)
        self.store.update({str(ckpt): (e, dict(state)) for ckpt, e in engines.items()})

    def load_resume(self, engine, ckpt):
        got = self.store.get(str(ckpt))
        if got is None:
            return None
        assert got[0] == engine  # each engine restores its own checkpoint
        return dict(got[1])


def test_several_engines_and_extra_state_are_checkpointed_and_resumed(tmp_path):
    strategy = Resumer()
    run = RunArgs(output_dir=str(tmp_path), resume=False, progress=False, logging_steps=1, save_steps=2,
                          stop_after_steps=0, save_total_limit=1)
    state = State(0.4)
    engines = {"actor": "A", "critic": "C"}
    step, log = loop.open_run(strategy, engines, {"run": run}, StepPlan(5, 5), "ppo", {}, state=state)
    assert step == 0
    for s in (1, 2, 3):
        state.kl = 0.1 * s
        log.after(s, {"kl": state.kl}, {})
    log.close()
    ck = tmp_path / "checkpoints"
    assert set(strategy.store) == {str(ck / "actor"), str(ck / "critic")}  # each engine in its own directory
    shape = {"world_size": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "seed": 1234,
             "steps_per_epoch": 5}
    assert all(st == {"step": 2, "kl_coef": 0.1 * 2, "shape": shape, "settings": {}, "window": {}}
               for _, st in strategy.store.values())

    resumed = State(0.4)
    run.resume = True
    step, log = loop.open_run(strategy, engines, {"run": run}, StepPlan(5, 5), "ppo", {}, state=resumed)
    log.close()
    assert step == 2 and resumed.kl == 0.1 * 2

    strategy.store[str(ck / "critic")] = ("C", {"step": 1, "kl_coef": 0.1})  # a run killed between the two saves
    with pytest.raises(SystemExit, match="different steps"):
        loop.open_run(strategy, engines, {"run": run}, StepPlan(5, 5), "ppo", {}, state=State(0.4))


def test_logged_rows_hold_window_means_and_a_resumed_run_logs_the_same(tmp_path):
    """A row logged every N steps held that step's values alone (a noisy curve: rewards/accuracies in eighths at
    batch 8); transformers' Trainer and TRL log the mean over the steps since the last row. The learning rate is
    the logged step's. The window's sums travel in the checkpoint, so a run cut between two rows logs the same."""
    def run_steps(strategy, run, steps):
        _, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(7, 7), "dpo", {})
        for s in steps:
            log.after(s, {"loss": float(s * s), "rewards/accuracies": 0.125 * s, "lr": 0.01 * s, "kind": "x",
                          "kl_coef": 0.1 * s}, {})
        log.close()
        assert all(m["kl_coef"] == pytest.approx(0.1 * m["step"]) for m in log.history)  # the step's, as lr
        return [(m["step"], {k: m[k] for k in ("loss", "rewards/accuracies", "lr", "kind")}) for m in log.history]

    def args(out, resume=False, stop=0):
        return RunArgs(output_dir=str(out), resume=resume, progress=False, logging_steps=3, save_steps=2,
                       stop_after_steps=stop, save_total_limit=1)

    full = run_steps(Resumer(), args(tmp_path / "full"), range(1, 8))
    assert full == [(3, {"loss": (1 + 4 + 9) / 3, "rewards/accuracies": 0.125 * 2, "lr": 0.03, "kind": "x"}),
                    (6, {"loss": (16 + 25 + 36) / 3, "rewards/accuracies": 0.125 * 5, "lr": 0.06, "kind": "x"}),
                    (7, {"loss": 49.0, "rewards/accuracies": 0.125 * 7, "lr": 0.07, "kind": "x"})]
    cut = Resumer()
    first = run_steps(cut, args(tmp_path / "cut", stop=4), range(1, 5))  # checkpoint at 4: step 4 in the window
    rest = run_steps(cut, args(tmp_path / "cut", resume=True), range(5, 8))
    assert first[:1] + rest == full


def test_a_resume_told_to_stop_at_or_before_its_step_is_refused(tmp_path):
    """Resumed at step 2 with --stop_after_steps 2 (or 1), the run trained nothing and exited as "interrupted",
    without saying why."""
    strategy = Resumer()
    run = RunArgs(output_dir=str(tmp_path), resume=False, progress=False, logging_steps=1, save_steps=2,
                  stop_after_steps=0, save_total_limit=1)
    _, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})
    for s in (1, 2):
        log.after(s, {}, {})
    log.close()
    run.resume = True
    for stop in (1, 2):
        run.stop_after_steps = stop
        with pytest.raises(SystemExit, match=f"--stop_after_steps {stop}: the checkpoint resumed is at step 2"):
            loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})
    run.stop_after_steps = 3
    step, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})
    log.close()
    assert step == 2


def test_resume_refuses_a_run_of_another_shape(tmp_path):
    """A resumed run with another world size, batch, accumulation, seed or data size would not continue the
    checkpoint's run (another data order): refused, naming what differs."""
    strategy = Resumer()
    run = RunArgs(output_dir=str(tmp_path), resume=False, progress=False, logging_steps=1, save_steps=1,
                          stop_after_steps=0, save_total_limit=1)
    _, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})
    log.after(1, {}, {})
    log.close()
    run.resume = True
    strategy.world_size = 2
    with pytest.raises(SystemExit, match="world_size 1 in the checkpoint, 2 now"):
        loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})
    strategy.world_size = 1
    with pytest.raises(SystemExit, match="steps_per_epoch 5 in the checkpoint, 4 now"):
        loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(4, 5), "sft", {})
    step, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(5, 5), "sft", {})  # the same shape resumes
    log.close()
    assert step == 1


def test_a_stand_in_batch_is_the_first_good_row_and_none_is_a_clear_error():
    """Every row bad (--skip_bad_rows): a rank short of a batch stopped with a bare StopIteration."""
    from training.engine.loop import stand_in_batch
    assert stand_in_batch(lambda idx: None if idx[0] < 2 else idx, 4) == [2]
    with pytest.raises(ValueError, match="none of the 3 rows makes a batch"):
        stand_in_batch(lambda idx: None, 3)


@pytest.mark.parametrize("n,world,bs", [(5, 2, 2), (8, 2, 3), (3, 4, 2), (1, 2, 1), (7, 3, 2)])
def test_rank_batches_cover_every_item_once_with_equal_batch_counts(n, world, bs):
    from training.engine.loop import rank_batches
    per_rank = [list(rank_batches(n, world, r, bs)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of forwards on every rank
    items = sorted(i for b in per_rank for batch in b for i in batch)
    assert items == list(range(n))
    assert all(len(batch) <= bs for b in per_rank for batch in b)


class _Engine:
    """A stand-in DeepSpeed engine: save_checkpoint writes root/tag/shard; `fail_at` raises there instead (a kill)."""

    def __init__(self, fail_at=None, seen=None):
        self.module, self.fail_at, self.seen = torch.nn.Linear(2, 2), fail_at, seen

    def save_checkpoint(self, root, tag, client_state, save_latest=True, exclude_frozen_parameters=False):
        # a plain model: its checkpoint holds it all; `latest` is the strategy's to write, once every engine and rank
        # is done
        assert not save_latest and not exclude_frozen_parameters
        if self.seen is not None:  # what the other engines' `latest` say while this one is written
            self.seen.append({p.parent.name: p.read_text() for p in Path(root).parent.glob("*/latest")})
        if tag == self.fail_at:
            raise KeyboardInterrupt("killed while writing")
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "shard").write_text("x")


def _strategy():
    from training.engine.strategy import Strategy
    s = object.__new__(Strategy)
    s.rank, s.world_size = 0, 1
    return s


def test_checkpoints_of_several_engines_are_committed_together(tmp_path):
    """PPO saves actor then critic: `latest` and rotation went engine by engine, so a kill between the two left the
    actor at step 2 and the critic at step 1 with the actor's step 1 already rotated out: nothing to resume."""
    s, seen = _strategy(), []
    roots = {tmp_path / "actor": _Engine(seen=seen), tmp_path / "critic": _Engine(fail_at="step2", seen=seen)}
    s.save_resume(roots, 1, {}, keep=1)
    with pytest.raises(KeyboardInterrupt):
        s.save_resume(roots, 2, {}, keep=1)
    assert [(r / "latest").read_text() for r in roots] == ["step1", "step1"]
    assert all((r / "step1" / "shard").exists() for r in roots)
    assert seen[-1] == {"actor": "step1", "critic": "step1"}  # the actor's step 2 was written, not yet named



def test_a_kill_between_the_engines_latest_files_resumes_from_the_step_written(tmp_path, monkeypatch):
    """save_resume names the new step in the actor's `latest`, then in the critic's, once both engines' checkpoints
    are written on every rank: a kill between the two left them naming steps 4 and 2, and --resume stopped ("the
    checkpoints are of different steps"), although step 4 was complete for both. It resumes from step 4."""
    import json

    from training.config import OptimArgs
    from training.engine import strategy as strategy_module

    class Loadable(_Engine):
        def save_checkpoint(self, root, tag, client_state, **kw):
            super().save_checkpoint(root, tag, client_state, **kw)
            (Path(root) / tag / "state.json").write_text(json.dumps(client_state))

        def load_checkpoint(self, root, **kw):
            tag = (Path(root) / "latest").read_text()
            return str(Path(root) / tag), json.loads((Path(root) / tag / "state.json").read_text())

    s, plan = _strategy(), StepPlan(5, 5)
    s.optim = OptimArgs()
    ck = tmp_path / "checkpoints"
    engines = {"actor": Loadable(), "critic": Loadable()}
    real = strategy_module.write_text_atomic

    def killed_at_the_critics_step4(path, text):
        if Path(path) == ck / "critic" / "latest" and text == "step4":
            raise KeyboardInterrupt("killed between the two latest files")
        real(path, text)
    monkeypatch.setattr(strategy_module, "write_text_atomic", killed_at_the_critics_step4)
    for step in (2, 4):
        state = {"step": step, "shape": loop.run_shape(s, plan), "settings": {}}
        with pytest.raises(KeyboardInterrupt) if step == 4 else contextlib.nullcontext():
            s.save_resume({ck / name: e for name, e in engines.items()}, step, state, keep=1)
    monkeypatch.setattr(strategy_module, "write_text_atomic", real)
    assert [(ck / n / "latest").read_text() for n in engines] == ["step4", "step2"]
    run = RunArgs(output_dir=str(tmp_path), resume=True, progress=False)
    step, log = loop.open_run(s, engines, {"run": run}, plan, "ppo", {})
    log.close()
    assert step == 4 and [(ck / n / "latest").read_text() for n in engines] == ["step4", "step4"]
    (ck / "critic" / "latest").unlink()  # killed before the critic's first `latest`: it is written
    loop.finish_interrupted_commit(s, ck, list(engines))
    assert (ck / "critic" / "latest").read_text() == "step4"

def test_rotation_keeps_the_checkpoint_just_written_and_drops_later_ones(tmp_path):
    """Resumed from step 2 after a kill while step 4 was written: saving step 3 with save_total_limit 1 kept the
    incomplete step 4 (the highest number) and deleted step 3, which `latest` named."""
    s, root = _strategy(), tmp_path / "ck"
    for k in (2, 4):
        (root / f"step{k}").mkdir(parents=True)
    (root / "latest").write_text("step2")
    s.save_resume({root: _Engine()}, 3, {}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step3"] and (root / "latest").read_text() == "step3"


def test_a_metrics_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, capsys):
    """The run killed as it wrote a row: --resume failed with a JSONDecodeError. A bad row before the last is
    still an error, naming the file and line."""
    from training.engine.metrics import MetricsLogger
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLogger(tmp_path, resume_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert "line 3 was cut short" in capsys.readouterr().out
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not a metrics row"):
        MetricsLogger(tmp_path, resume_step=2)


def test_samples_past_the_last_whole_step_are_said_to_be_left_out(tmp_path, capsys):
    """10 samples, micro-batch 3, accumulation 2: one step of 6 per epoch, 4 left out each epoch without a word."""
    plan = StepPlan.make(10, 3, 2, 1, 1.0, 0)
    assert (plan.steps_per_epoch, plan.unused_per_epoch) == (1, 4)
    run = RunArgs(output_dir=str(tmp_path), progress=False)
    main_rank = Resumer()
    main_rank.is_main = True
    _, log = loop.open_run(main_rank, {"": "E"}, {"run": run}, plan, "sft", {})
    log.close()
    assert "4 samples are left out of each one" in capsys.readouterr().out


@pytest.mark.parametrize("per_epoch,epochs,want", [(100, 0.29, 29), (100, 0.57, 57), (10, 0.25, 3), (7, 2.0, 14),
                                                   (3, 0.1, 1), (10, 0.7, 7), (10, 1.01, 11)])
def test_a_fraction_of_epochs_is_its_whole_steps_without_binary_rounding(per_epoch, epochs, want):
    """0.29 epochs of 100 steps is 28.999... in binary floating point: int() trained 28 steps (0.57: 56), in SFT, the
    reward model, DPO and PPO alike (PPO had its own copy of the rule). A part step is rounded up, as transformers'
    Trainer does (0.25 x 10 trained 2 steps; Trainer's ceil() makes it 3), after the 9-decimal rounding (0.7 x 10 is
    7.000000000000001 in binary, which ceil() alone makes 8)."""
    from training.config import OptimArgs
    from training.ppo.args import PPOArgs
    from training.ppo.trainer import PPOTrainer
    assert StepPlan.make(per_epoch * 4, 2, 2, 1, epochs, -1).total_steps == want
    assert StepPlan.make(per_epoch * 4, 2, 2, 1, epochs, 5).total_steps == 5  # max_steps wins
    strategy = SimpleNamespace(world_size=2, ds=SimpleNamespace(zero_stage=0))
    cfg = {"ppo": PPOArgs(rollout_batch_size=2, reward_norm_window=0),
           "optim": OptimArgs(num_train_epochs=epochs, per_device_train_batch_size=2)}
    ppo = PPOTrainer(strategy, *[None] * 8, "llava", "llava", list(range(per_epoch * 4)), "", cfg)
    assert (ppo.steps_per_epoch, ppo.total_steps) == (per_epoch, want)


def test_resume_refuses_data_of_another_size_with_the_same_steps_per_epoch(tmp_path):
    """24 samples, then 25 (a row added to the data file) at micro-batch 2: 12 steps per epoch either way, so the
    resume went on, on another permutation (the checkpoint run's step 2 was samples [2, 8], the resumed run's
    [13, 24]). The number of samples is part of the shape."""
    from training.engine.loop import epoch_micro_batches
    assert epoch_micro_batches(24, 2, 1, 0, 1234, 0)[1] != epoch_micro_batches(25, 2, 1, 0, 1234, 0)[1]
    strategy = Resumer()
    run = RunArgs(output_dir=str(tmp_path), progress=False, logging_steps=1, save_steps=1)
    _, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan.make(24, 2, 1, 1, 1.0, -1), "sft", {})
    log.after(1, {}, {})
    log.close()
    run.resume = True
    with pytest.raises(SystemExit, match="samples 24 in the checkpoint, 25 now"):
        loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan.make(25, 2, 1, 1, 1.0, -1), "sft", {})
    step, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan.make(24, 2, 1, 1, 1.0, -1), "sft", {})
    log.close()
    assert step == 1


@pytest.mark.parametrize("argv,match", [
    (["--logging_steps", "0"], "--logging_steps 0: log every N >= 1"),
    (["--save_steps", "-2", "--eval_steps", "-1"], "--eval_steps -1, --save_steps -2")])
def test_step_counts_are_checked_as_the_options_are_read(argv, match):
    """--logging_steps 0 passed, and the run stopped at its first step (after loading its models) on a
    ZeroDivisionError in StepLog.due."""
    from training.config import parse_config
    with pytest.raises(SystemExit, match=match):
        parse_config({"run": RunArgs}, argv)
    assert parse_config({"run": RunArgs}, ["--logging_steps", "1", "--save_steps", "0"])["run"].logging_steps == 1


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_float_option_that_is_no_finite_number_is_refused(value):
    """float() reads "nan" and "inf": --learning_rate nan trained NaN weights, found only at the first checkpoint's
    finite-weight check."""
    from training.config import OptimArgs, parse_config
    with pytest.raises(SystemExit, match=f"--learning_rate {float(value)}: give a finite number"):
        parse_config({"optim": OptimArgs}, ["--learning_rate", value])


def test_ppo_says_how_many_prompts_each_epoch_leaves_out(monkeypatch):
    """10 prompts in rollout batches of 4 (one rank): 2 steps an epoch and 2 prompts left out of each, which PPO's plan
    did not count (unused_per_epoch 0), so open_run's notice ("nothing left out without a word") never came."""
    from training.config import OptimArgs
    from training.ppo import trainer as ppo_trainer
    from training.ppo.args import PPOArgs

    class Opened(Exception):
        pass

    def open_run(strategy, engines, cfg, plan, *args, **kw):
        raise Opened(plan)
    monkeypatch.setattr(ppo_trainer, "open_run", open_run)
    strategy = SimpleNamespace(world_size=1, ds=SimpleNamespace(zero_stage=0))
    cfg = {"ppo": PPOArgs(rollout_batch_size=4, reward_norm_window=0), "run": RunArgs(),
           "optim": OptimArgs(per_device_train_batch_size=4)}
    ppo = ppo_trainer.PPOTrainer(strategy, None, None, "ref", *[None] * 5, "llava", "llava", list(range(10)), "", cfg)
    with pytest.raises(Opened) as got:
        ppo.train()
    plan = got.value.args[0]
    assert (plan.steps_per_epoch, plan.unused_per_epoch, plan.shape["samples"]) == (2, 2, 10)


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_no_epochs_without_max_steps_is_refused(epochs):
    """--num_train_epochs 0 (or below) without --max_steps trained one step (total_steps' floor of one)."""
    from training.config import OptimArgs, parse_config
    with pytest.raises(SystemExit, match=f"--num_train_epochs {epochs}.0: give a number of epochs > 0"):
        parse_config({"optim": OptimArgs}, ["--num_train_epochs", epochs])
    assert parse_config({"optim": OptimArgs}, ["--num_train_epochs", "0", "--max_steps", "3"])["optim"].max_steps == 3


def test_planned_steps_cover_each_epoch_draw_new_numbers_each_step_and_resume_mid_epoch():
    """8 samples, micro-batch 2, 2 epochs: each epoch's steps hold every sample once, in another order each epoch;
    every step draws other random numbers (dropout: the same masks at every step passed every resume test, which
    compare two runs sharing the mistake); a run resumed after step 5 (in epoch 2) makes the uninterrupted run's
    steps 6-8, batches and random numbers alike; two ranks split each step's samples."""
    from training.engine.loop import planned_steps

    def run(plan, start, world=1, rank=0):
        return [(step, epoch, mbs, torch.rand(1).item())
                for step, epoch, mbs in planned_steps(plan, start, 8, 2, 1, world, rank, seed=3)]

    full = run(StepPlan.make(8, 2, 1, 1, 2.0, -1), 0)
    assert [s for s, *_ in full] == list(range(1, 9)) and [e for _, e, *_ in full] == [0] * 4 + [1] * 4
    epochs = [[i for _, e, mbs, _ in full if e == k for i in mbs[0]] for k in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]
    assert len({r for *_, r in full}) == 8
    assert run(StepPlan.make(8, 2, 1, 1, 2.0, -1), 5) == full[5:]
    ranks = [run(StepPlan.make(8, 2, 1, 2, 1.0, -1), 0, 2, r) for r in (0, 1)]
    assert all(not set(a[2][0]) & set(b[2][0]) for a, b in zip(*ranks))
    assert sorted(i for rows in ranks for _, _, mbs, _ in rows for i in mbs[0]) == list(range(8))


def test_a_metric_missing_from_some_steps_is_averaged_over_the_steps_that_have_it(tmp_path):
    """PPO's critic warm-up steps train no actor and report no policy_loss, clipfrac or entropy: a row spanning warm-up
    steps and actor steps divided the actor steps' sum by every step of the window (policy loss 1.0 logged as 0.5).
    Each metric is its mean over the steps that report it (as TRL averages its stored metrics), also after a resume."""
    def args(out, resume=False, stop=0):
        return RunArgs(output_dir=str(out), resume=resume, progress=False, logging_steps=4, save_steps=0,
                       stop_after_steps=stop, save_total_limit=1)

    def run_steps(strategy, run, steps):
        _, log = loop.open_run(strategy, {"": "E"}, {"run": run}, StepPlan(8, 8), "ppo", {})
        for s in steps:
            log.after(s, {"value_loss": float(s), **({"policy_loss": 1.0 + s} if s > 2 else {})}, {})
        log.close()
        return [(m["step"], m.get("policy_loss"), m["value_loss"]) for m in log.history]

    full = run_steps(Resumer(), args(tmp_path / "full"), range(1, 9))
    assert full == [(4, (4.0 + 5.0) / 2, 2.5), (8, 7.5, 6.5)]
    cut = Resumer()
    run_steps(cut, args(tmp_path / "cut", stop=3), range(1, 4))  # checkpoint at 3: one actor step in the window
    assert run_steps(cut, args(tmp_path / "cut", resume=True), range(4, 9)) == full


def test_resumed_logs_drop_the_interrupted_runs_later_steps_and_a_fresh_run_starts_anew(tmp_path):
    """Tensorboard's events past the resumed step are purged as metrics.jsonl's rows are (without it a step showed
    twice), a fresh run does not append to an earlier run's metrics.jsonl, the last step saves no resumable
    checkpoint (the stage saves its final model) and each rank draws its own random numbers: dropping any of them
    passed every test."""
    from sft_helpers import tb_scalars

    from training.engine.loop import planned_steps, save_due
    from training.engine.metrics import MetricsLogger, read_metrics
    first = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, resume_step=2)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert tb_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0),
                                                                                          (3, 30.0)]
    MetricsLogger(tmp_path).close()
    assert not (tmp_path / "metrics.jsonl").exists()
    run = SimpleNamespace(save_steps=3, stop_after_steps=0)
    assert [s for s in range(1, 7) if save_due(s, 6, run)] == [3]
    assert not save_due(6, 6, SimpleNamespace(save_steps=0, stop_after_steps=6))
    plan = StepPlan.make(8, 2, 1, 2, 1.0, -1)
    draws = [[torch.rand(1).item() for _ in planned_steps(plan, 0, 8, 2, 1, 2, rank, seed=3)] for rank in (0, 1)]
    assert all(a != b for a, b in zip(*draws))
