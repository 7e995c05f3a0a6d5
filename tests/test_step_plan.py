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
