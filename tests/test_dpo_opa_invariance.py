"""OPA-DPO's DPO step (four pairs per row over a real and a masked image) accumulates as one batch: batch 4 x
accumulation 1 equals batch 1 x accumulation 4, in the sequence-level form and the released per-token form."""
import json

import pytest
import torch
from dist_dpo_driver import dpo_args
from sft_helpers import weights

from training.dpo.main import main


def opa_pairs(world, path):
    """4 rows of the world's preference pairs as OPA-DPO pairs (answers of unequal lengths, weighted sentences)."""
    rows = []
    for r in json.loads((world / "preference_train.json").read_text())[:4]:
        gt, rollout = r["conversations"][1]["value"]
        rows.append({"id": r["id"], "image": r["image"], "question": "Describe the image in detail.", "gt": gt,
                     "rollout": rollout, "revised": gt, "rollout_weights": [[rollout, 2.5]],
                     "revised_score_weights": [[gt, 1.0]], "revised_type_weights": [[gt, 1.5]]})
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("form", [(), ("--opa_token_level", "--no-precompute_ref")])
def test_opa_accumulation_equals_one_batch(world, tiny, tmp_path, form):
    # no clipping: a clipped update is the gradient's direction alone, blind to a wrong accumulation scale
    common = ("--loss_type", "opa", "--data_path", opa_pairs(world, tmp_path / "pairs.json"), "--optimizer", "sgd",
              "--learning_rate", "0.2", "--max_steps", "2", "--max_grad_norm", "0", *form)
    main(dpo_args(world, tiny, tmp_path / "a", *common, "--per_device_train_batch_size", "4"))
    main(dpo_args(world, tiny, tmp_path / "b", *common, "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "4"))
    a, b, init = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tiny)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    for x, y in zip(*rows):
        for k in ("loss", "opa/margin2", "opa/margin4", "logps/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_opa_resumed_run_logs_and_ends_as_an_uninterrupted_one(world, tiny, tmp_path):
    """Rows read in twos (real and masked image) and their reference cache across a stop and --resume: the same
    weights, AdamW state and learning-rate schedule, so the same metrics row for row."""
    common = ("--loss_type", "opa", "--data_path", opa_pairs(world, tmp_path / "pairs.json"), "--max_steps", "4",
              "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine",
              "--num_warmup_steps", "1")
    main(dpo_args(world, tiny, tmp_path / "full", *common))
    assert main(dpo_args(world, tiny, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "3"))[
        "interrupted"]
    main(dpo_args(world, tiny, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    full, cut = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in
                 ("full", "cut"))
    assert [r["step"] for r in cut] == [r["step"] for r in full] == [1, 2, 3, 4]
    for x, y in zip(full, cut):
        for k in x:
            if not k.endswith("_per_s") and k != "time":
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (x["step"], k)
