"""StepLog: the bookkeeping after each optimizer step that the SFT, RM and DPO loops share."""
from types import SimpleNamespace

from training.engine import loop
from training.engine.loop import StepLog, StepPlan


class Recorder:
    def __init__(self):
        self.logged, self.saved, self.closed = [], [], False

    def log(self, step, m):
        self.logged.append((step, dict(m)))

    def close(self):
        self.closed = True

    def save_resume(self, engine, ckpt, step, state, limit):
        self.saved.append(step)


def make(logging_steps=2, save_steps=3, total=7):
    rec = Recorder()
    run = SimpleNamespace(logging_steps=logging_steps, save_steps=save_steps, stop_after_steps=0, save_total_limit=1)
    return rec, StepLog(rec, None, run, StepPlan(4, total), None, rec, None, {})


def test_rates_are_amounts_since_last_log_over_elapsed_time(monkeypatch):
    clock = iter([0.0, 2.0, 6.0, 9.0, 10.0])  # start, log at step 2, its reset, log at step 4, its reset
    monkeypatch.setattr(loop.time, "time", lambda: next(clock))
    rec, log = make(total=4)
    for step, pairs in zip(range(1, 5), (8, 8, 4, 4)):
        log.after(step, {"loss": float(step)}, {"pairs_per_s": pairs})
    assert [s for s, _ in rec.logged] == [2, 4]
    assert rec.logged[0][1]["pairs_per_s"] == 16 / 2.0  # 8 + 8 pairs in 2 s
    assert rec.logged[1][1]["pairs_per_s"] == 8 / 3.0  # 4 + 4 pairs in 9 - 6 s
    assert rec.logged[1][1]["epoch"] == 1.0  # 4 steps of a 4-step epoch
    assert [h["step"] for h in log.history] == [2, 4]


def test_last_step_is_logged_extra_only_when_logged_and_checkpoints_when_due():
    rec, log = make(logging_steps=2, save_steps=3, total=7)
    calls = []
    for step in range(1, 8):
        log.after(step, {"loss": 0.0}, {}, extra=lambda: calls.append(1) or {"eval/loss": 1.5})
    assert [s for s, _ in rec.logged] == [2, 4, 6, 7]  # every 2nd step and the last
    assert len(calls) == 4 and all(m["eval/loss"] == 1.5 for _, m in rec.logged)
    assert rec.saved == [3, 6]  # every save_steps, never at the end (the stage saves its final model)
    log.close(keep_logger=True)
    assert not rec.closed
    log.close()
    assert rec.closed
