"""PPO on two CPU ranks at ZeRO 0, 1, 2 and 3, each rank with half of the rollout batch, equals one rank with all of
it: the same rollouts, scores, advantages and actor update (responses of unequal lengths)."""
import json
from pathlib import Path

import pytest
import torch
from dist_ppo_ranks_driver import COMMON, greedy_cut_by_prompt
from sft_helpers import make_reward_model, ppo_args, run_two_ranks, weights

import training.ppo.trainer as trainer
from training.ppo.main import main


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_on_two_ranks_at_every_zero_stage_equals_one_rank(world, tiny, tmp_path, monkeypatch):
    rm = make_reward_model(tiny, tmp_path / "rm")
    run_two_ranks("dist_ppo_ranks_driver.py", world, tiny, rm, tmp_path)
    monkeypatch.setattr(trainer, "generate_rollouts", trainer.generate_rollouts)  # put back after the test
    monkeypatch.setattr(trainer, "DecodeArgs", trainer.DecodeArgs)
    greedy_cut_by_prompt()
    lengths, generate = [], trainer.generate_rollouts

    def recorded(*args, **kwargs):
        ro = generate(*args, **kwargs)
        lengths.append(ro.lengths.tolist())
        return ro
    monkeypatch.setattr(trainer, "generate_rollouts", recorded)
    main(ppo_args(world, tiny, rm, tmp_path / "single", "--rollout_batch_size", "4", "--per_device_train_batch_size",
                  "4", *COMMON))
    ref, init, want = weights(tmp_path / "single"), weights(tiny), _rows(tmp_path / "single")
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3  # the actor moved
    assert all(len(set(n)) > 1 for n in lengths), lengths  # responses of unequal lengths in each step
    for stage in range(4):
        got = weights(tmp_path / f"zero{stage}")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"zero{stage} {k}")
        for a, b in zip(_rows(tmp_path / f"zero{stage}"), want):
            for k in ("reward/mean", "response_length", "kl", "explained_variance"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (stage, a["step"], k)
