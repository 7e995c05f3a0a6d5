"""The loss a DPO-family run optimises, read back from its own metrics: with one pair per step, rewards/margins is
beta * h of that pair, so the logged loss must be the --loss_type's function of it, with the options as given
(--label_smoothing for cdpo, --beta, --no-ipo_average). The end-to-end test checks step 1 only, where h = 0 and
sigmoid, cDPO at any smoothing give log 2 alike; the hand-value tests call the loss functions directly."""
import json
import math

import pytest
from dist_dpo_driver import dpo_args

from training.dpo.main import main


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


CASES = {  # loss_type, options, loss of the margin m = beta * h (beta 0.5)
    "sigmoid": (("--loss_type", "sigmoid"), lambda m: _softplus(-m)),
    "cdpo": (("--loss_type", "cdpo", "--label_smoothing", "0.3"), lambda m: 0.7 * _softplus(-m) + 0.3 * _softplus(m)),
    "ipo_sum": (("--loss_type", "ipo", "--no-ipo_average"), lambda m: (m / 0.5 - 1.0) ** 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_logged_loss_is_the_loss_types_function_of_the_margin(world, tiny, tmp_path, case):
    flags, loss_of = CASES[case]
    out = tmp_path / case
    main(dpo_args(world, tiny, out, *flags, "--beta", "0.5", "--max_steps", "2", "--per_device_train_batch_size", "1",
                  "--optimizer", "sgd", "--learning_rate", "0.05"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference (float32 sums)
    assert any(abs(r["rewards/margins"]) > 1e-3 for r in rows[1:])  # the policy moved: h != 0 tells losses apart
    for r in rows:
        assert r["loss"] == pytest.approx(loss_of(r["rewards/margins"]), rel=1e-4, abs=1e-6), r
