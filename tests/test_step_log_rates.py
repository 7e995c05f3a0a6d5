"""StepLog's rates (pairs/s, tokens/s) are of training time: neither a held-out evaluation nor writing a resumable
checkpoint (with the bad-rows report) is in the time they divide by."""
from pathlib import Path
from types import SimpleNamespace

from test_step_log import Recorder

from training.engine import loop
from training.engine.loop import StepLog, StepPlan


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_checkpoint_written_between_logged_steps_is_not_in_the_next_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop.time, "time", clock)
    rec = Recorder()
    real_save = rec.save_resume

    def slow_save(*a):  # a checkpoint that takes 100 s to write (a big model's optimizer state)
        clock.now += 100.0
        return real_save(*a)

    rec.save_resume = slow_save
    rec.write_report = lambda report, out: None
    run = SimpleNamespace(logging_steps=2, save_steps=2, stop_after_steps=0, save_total_limit=1, eval_steps=0,
                          output_dir="out")
    log = StepLog(rec, {"": None}, run, StepPlan(4, 4), Path("ck"), rec, None, {}, report=object())
    for step in range(1, 5):
        clock.now += 1.0  # each step trains for 1 s
        log.after(step, {"loss": 0.0}, {"pairs_per_s": 8})
    assert rec.saved == [2]
    assert [s for s, _ in rec.logged] == [2, 4]
    assert rec.logged[0][1]["pairs_per_s"] == 16 / 2.0
    assert rec.logged[1][1]["pairs_per_s"] == 16 / 2.0  # 2 s of training, not 102 s with the checkpoint's


def test_the_reward_models_lists_per_s_counts_the_lists_trained_not_those_skipped(world, tiny, tmp_path, monkeypatch):
    """A list whose row could not be encoded (skipped with --skip_bad_rows) is not trained: lists_per_s counted every
    list the step planned, skipped ones too, while tokens_per_s counted the tokens trained."""
    from test_rm import rm_args

    from training.rm.data import RMDataset
    from training.rm.main import main
    from training.rm.trainer import RMTrainer

    real_item, real_batch, real_after = RMDataset.__getitem__, RMTrainer._batch, StepLog.after
    trained, rates = [], []
    monkeypatch.setattr(RMDataset, "__getitem__", lambda self, i: None if i % 3 == 1 else real_item(self, i))

    def batch(self, ds, idx):
        if ds is self.train_set:
            trained.append(sum(ds[i] is not None for i in idx))
        return real_batch(self, ds, idx)

    def after(self, step, m, r, evaluate=None):
        rates.append(dict(r))
        return real_after(self, step, m, r, evaluate)

    monkeypatch.setattr(RMTrainer, "_batch", batch)
    monkeypatch.setattr(StepLog, "after", after)
    main(rm_args(world, tiny, tmp_path / "o", "--max_steps", "2", "--per_device_train_batch_size", "3",
                 "--gradient_accumulation_steps", "2", "--eval_data_path", "", "--skip_bad_rows"))
    assert len(rates) == 2 and len(trained) == 4 and sum(trained) < 12
    assert [r["lists_per_s"] for r in rates] == [trained[0] + trained[1], trained[2] + trained[3]]
