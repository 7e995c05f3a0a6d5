"""PPO stage end to end on the tiny VLM: metrics, saving, resume, and the non-finite guard."""
import json

import pytest
import torch
from sft_helpers import make_reward_model, ppo_args, weights

from training.ppo.main import main
from training.ppo.trainer import NonFiniteError, PPOTrainer


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def test_ppo_end_to_end(world, tiny, rm, tmp_path):
    out = tmp_path / "ppo"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2", "--ppo_epochs", "2", "--kl_estimator", "k3"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/std", "kl", "entropy", "clipfrac", "value_loss", "policy_loss",
                "explained_variance", "response_length", "gen_tokens_per_s", "train_tokens_per_s"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert all(0 < r["response_length"] <= 8 for r in rows)
    w, init = weights(out), weights(tiny)
    assert sum(float((w[k] - init[k]).abs().max()) for k in w) > 0  # the actor moved


def test_ppo_lora_actor_uses_disabled_adapters_as_reference(world, tiny, rm, tmp_path):
    out = tmp_path / "ppo_lora"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # before the first update the actor IS the reference: KL is exactly 0
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (out / "adapter").exists()


def test_ppo_resume_equals_uninterrupted(world, tiny, rm, tmp_path):
    common = ["--max_steps", "2"]
    main(ppo_args(world, tiny, rm, tmp_path / "full", *common))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_non_finite_reward_stops_and_keeps_last_checkpoint(world, tiny, rm, tmp_path, monkeypatch):
    real = PPOTrainer._scores

    def poisoned(self, records, images, responses):
        s = real(self, records, images, responses)
        return s * float("nan") if self._step >= 1 else s

    monkeypatch.setattr(PPOTrainer, "_scores", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match="non-finite reward at PPO step 2"):
        main(ppo_args(world, tiny, rm, out, "--max_steps", "3", "--save_steps", "1"))
    ckpt = out / "checkpoints" / "actor"
    assert (ckpt / "latest").read_text().strip() == "step1" and (ckpt / "step1").is_dir()
