"""StepPlan and planned_steps beyond tests/test_step_log.py: several ranks, gradient accumulation, a stop."""
from training.engine.loop import StepPlan, planned_steps


def test_samples_left_out_count_every_ranks_share():
    """10 samples, micro-batch 1, no accumulation, 3 ranks: 3 steps of 3 samples, 1 left out (the count ignored the
    ranks, so 7 were said to be left out)."""
    plan = StepPlan.make(10, 1, 1, 3, 1.0, -1)
    assert (plan.steps_per_epoch, plan.unused_per_epoch) == (3, 1)
    plan = StepPlan.make(20, 2, 2, 2, 1.0, -1)  # 8 samples a step: 2 steps, 4 left out
    assert (plan.steps_per_epoch, plan.unused_per_epoch) == (2, 4)


def test_max_steps_zero_is_no_limit():
    """--max_steps 0 is read as no limit (training.config checks epochs for max_steps <= 0): 8 samples, micro-batch
    2, 2 epochs are 8 steps, not 0."""
    assert StepPlan.make(8, 2, 1, 1, 2.0, 0).total_steps == 8
    assert StepPlan.make(8, 2, 1, 1, 2.0, -1).total_steps == 8
    assert StepPlan.make(8, 2, 1, 1, 2.0, 3).total_steps == 3


def _steps(plan, micro, accum, world=1, rank=0, start=0, stop_after=0):
    return [(step, mbs) for step, _, mbs in planned_steps(plan, start, 12, micro, accum, world, rank, 5, stop_after)]


def test_each_step_takes_its_own_accumulated_micro_batches_and_the_global_batch_is_the_same_on_more_ranks():
    """12 samples: one rank with micro-batch 1 draws them in an order P. Micro-batch 2 x 2 accumulation makes step k
    of P[4k-4:4k-2] and P[4k-2:4k] (the tests before ran accumulation 1 only: a step sliced mbs[j:(j+1)*accum]
    went unnoticed); two ranks of micro-batch 1 x 2 accumulation share out the same 4 samples each step."""
    order = [mbs[0][0] for _, mbs in _steps(StepPlan.make(12, 1, 1, 1, 1.0, -1), 1, 1)]
    assert sorted(order) == list(range(12))
    got = _steps(StepPlan.make(12, 2, 2, 1, 1.0, -1), 2, 2)
    assert got == [(k, [order[4 * k - 4:4 * k - 2], order[4 * k - 2:4 * k]]) for k in (1, 2, 3)]
    ranks = [_steps(StepPlan.make(12, 1, 2, 2, 1.0, -1), 1, 2, 2, r) for r in (0, 1)]
    for k in (1, 2, 3):
        steps = [dict(rows)[k] for rows in ranks]
        assert all(len(mbs) == 2 and all(len(mb) == 1 for mb in mbs) for mbs in steps)
        assert sorted(i for mbs in steps for mb in mbs for i in mb) == sorted(order[4 * k - 4:4 * k])


def test_an_interrupt_stops_after_its_step_within_an_epoch():
    """12 samples, micro-batch 2 x 2: 3 steps an epoch, 6 in 2 epochs. --stop_after_steps 2 runs steps 1-2 (a
    `step > end` check ran on to the epoch's step 3; the stop ignored ran all 6), resumed after 2 with a stop at 5
    runs 3-5, and a stop past the end runs to the end."""
    plan = StepPlan.make(12, 2, 2, 1, 2.0, -1)
    assert plan.total_steps == 6
    assert [s for s, _ in _steps(plan, 2, 2, stop_after=2)] == [1, 2]
    assert [s for s, _ in _steps(plan, 2, 2, start=2, stop_after=5)] == [3, 4, 5]
    assert [s for s, _ in _steps(plan, 2, 2, stop_after=9)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _steps(plan, 2, 2, start=4)] == [5, 6]


def test_no_held_out_evaluation_at_the_last_step_when_eval_steps_divides_it():
    """6 steps, --eval_steps 3: an evaluation after step 3 only; the stage evaluates its saved model after the loop
    (tests/test_step_log.py ran 7 steps, which 3 does not divide: evaluating at the last step went unnoticed)."""
    from pathlib import Path
    from types import SimpleNamespace

    from test_step_log import Recorder

    from training.engine.loop import StepLog
    rec, calls = Recorder(), []
    run = SimpleNamespace(logging_steps=2, save_steps=0, stop_after_steps=0, save_total_limit=1, eval_steps=3)
    log = StepLog(rec, {"": None}, run, StepPlan(6, 6), Path("ck"), rec, None, {})
    for step in range(1, 7):
        log.after(step, {"loss": 0.0}, {}, evaluate=lambda: calls.append(step) or {"eval/loss": 1.0})
    assert calls == [3]
    assert [s for s, m in rec.logged if "eval/loss" in m] == [3] and [s for s, _ in rec.logged] == [2, 3, 4, 6]
