"""PPO options that no test followed into the run: --clip_eps and --value_clip_eps reach the two losses,
--no-whiten_advantages hands the policy loss GAE's advantages as they are, --no-normalize_reward leaves the
reward model's score as it is, and --critic_init is the checkpoint the critic is built from."""
import json

import pytest
import torch
from sft_helpers import make_reward_model, ppo_args


def test_clip_whitening_normalisation_and_critic_init_options_reach_the_run(world, tiny, tmp_path, monkeypatch):
    import training.ppo.trainer as trainer_mod
    import training.rm.model as rm_mod
    from training.ppo.main import main

    rm = make_reward_model(tiny, tmp_path / "rm")
    critic = make_reward_model(tiny, tmp_path / "critic", seed=1)
    seen = {"gae": [], "policy": [], "value": [], "rm": []}
    real_gae, real_pl, real_vl, real_rm = (trainer_mod.gae, trainer_mod.ppo_policy_loss, trainer_mod.ppo_value_loss,
                                           rm_mod.load_reward_model)

    def gae(*a, **k):
        out = real_gae(*a, **k)
        seen["gae"].append(out[0].clone())
        return out

    def pl(logp, old_logp, adv, mask, clip_eps=0.2):
        seen["policy"].append((adv.detach().clone(), clip_eps))
        return real_pl(logp, old_logp, adv, mask, clip_eps)

    def vl(values, old_values, returns, mask, clip_eps=0.2):
        seen["value"].append(clip_eps)
        return real_vl(values, old_values, returns, mask, clip_eps)

    def load_rm(path, *a, for_training=False, **k):
        seen["rm"].append((str(path), for_training))
        return real_rm(path, *a, for_training=for_training, **k)

    for name, f in (("gae", gae), ("ppo_policy_loss", pl), ("ppo_value_loss", vl)):
        monkeypatch.setattr(trainer_mod, name, f)
    monkeypatch.setattr(rm_mod, "load_reward_model", load_rm)
    out = tmp_path / "out"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "1", "--per_device_train_batch_size", "4",
                  "--clip_eps", "0.3", "--value_clip_eps", "0.7", "--no-whiten_advantages", "--no-normalize_reward",
                  "--length_bonus", "0", "--missing_eos_penalty", "0", "--reward_clip", "0",
                  "--critic_init", str(critic)))
    assert [c for _, c in seen["policy"]] == [0.3] and seen["value"] == [0.7]
    (adv, _), = seen["policy"]
    torch.testing.assert_close(adv, seen["gae"][0], rtol=0, atol=0)  # not whitened
    assert float(adv.abs().max()) > 0
    assert seen["rm"] == [(str(rm), False), (str(critic), True)]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # no normalisation, clipping, length bonus or stop-token penalty: the shaped score is the reward model's
    assert row["reward/shaped_mean"] == pytest.approx(row["reward/mean"], rel=1e-6, abs=1e-7)
    assert abs(row["reward/mean"]) > 1e-3  # (normalised, the first step's mean would be 0)
