"""Accumulation invariance of the DPO losses test_dpo.py does not accumulate: batch 4 x accumulation 1 equals
batch 1 x accumulation 4 (one SGD step is the gradient, so the weights agree) for IPO over pairs and the listwise
loss over ranked lists of unequal size (lists of 3 among pairs)."""
import json

import pytest
import torch
from dist_dpo_driver import dpo_args
from sft_helpers import weights
from test_rm import mixed_lists

from training.dpo.main import main


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["ipo", "listwise"])
def test_accumulation_equals_one_batch(world, tiny, tmp_path, loss_type):
    data = ("--data_path", mixed_lists(world, tmp_path / "mixed.json")[1]) if loss_type == "listwise" else ()
    lr = "0.002" if loss_type == "ipo" else "0.5"  # IPO's squared loss has large gradients
    # no clipping: a clipped update is the gradient's direction alone, blind to a wrong accumulation scale
    common = ("--loss_type", loss_type, "--optimizer", "sgd", "--learning_rate", lr, "--max_steps", "2",
              "--max_grad_norm", "0", *data)
    main(dpo_args(world, tiny, tmp_path / "a", *common, "--per_device_train_batch_size", "4"))
    main(dpo_args(world, tiny, tmp_path / "b", *common, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4"))
    a, b, init = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tiny)
    assert sum(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    for x, y in zip(_rows(tmp_path / "a"), _rows(tmp_path / "b")):
        # (at step 1 the policy is the reference: every reward is 0 give or take rounding, the accuracy a coin toss)
        for k in ("loss", "rewards/margins", "logps/rejected", *(("rewards/accuracies",) if x["step"] > 1 else ())):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
