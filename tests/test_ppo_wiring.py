"""PPO's options reach the run: the critic starts as the reward model, the warm-up holds the actor, the KL
estimator and the adaptive controller are the ones asked for, a non-finite KL or loss stops the run with the
last checkpoint intact, and the metrics reach tensorboard (not only its folder)."""
import json

import pytest
import torch
from sft_helpers import make_reward_model, ppo_args, tb_scalars

from training.ppo.main import main
from training.ppo.trainer import NonFiniteError, PPOTrainer


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def moved_rm(tiny, tmp_path_factory):
    """A reward model whose backbone is not the SFT model's (every weight moved), so a critic built from the actor's
    checkpoint, or with a fresh head, is told apart from one initialised from the reward model."""
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor, save_model
    from training.rm.model import RewardModel

    out = tmp_path_factory.mktemp("moved_rm")
    torch.manual_seed(5)
    backbone, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs())
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model(RewardModel(backbone, factual=True), processor, out)
    return out


@pytest.mark.parametrize("zero", ["0", "3"])
def test_the_critic_starts_as_the_reward_model(world, tiny, moved_rm, tmp_path, monkeypatch, zero):
    import deepspeed

    seen = {}

    def train(self):
        for name, engine in (("critic", self.critic), ("rm", self.rm)):
            module = engine.module if hasattr(engine, "module") else engine
            params = dict(module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values())):
                seen[name] = {k: v.detach().clone() for k, v in params.items()}
        raise SystemExit("checked")

    monkeypatch.setattr(PPOTrainer, "train", train)
    with pytest.raises(SystemExit, match="checked"):
        main(ppo_args(world, tiny, moved_rm, tmp_path / "c", "--max_steps", "1", "--zero_stage", zero))
    critic, rm = seen["critic"], seen["rm"]
    assert set(critic) == set(rm) and "value_head.weight" in critic
    for k in rm:
        torch.testing.assert_close(critic[k], rm[k], rtol=0, atol=0, msg=k)
    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor
    sft = dict(load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs())[0].named_parameters())
    moved = [k for k, v in sft.items() if not torch.equal(critic[f"backbone.{k}"], v.detach())]
    assert len(moved) > len(sft) // 2  # the reward model's weights, not the SFT checkpoint's


def test_critic_warmup_leaves_the_actor_unchanged(world, tiny, rm, tmp_path):
    """k1 KL at step 2 is 0 exactly when step 1 (the warm-up) left the actor at the reference."""
    common = ["--max_steps", "2", "--learning_rate", "1e-2", "--kl_estimator", "k1"]
    main(ppo_args(world, tiny, rm, tmp_path / "warm", *common, "--critic_warmup_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "cold", *common))
    warm, cold = _rows(tmp_path / "warm"), _rows(tmp_path / "cold")
    assert [r["actor_trained"] for r in warm] == [0.0, 1.0] and "policy_loss" not in warm[0]
    assert "value_loss" in warm[0] and warm[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(cold[1]["kl"]) > 1e-4


def test_the_adaptive_kl_controller_moves_the_coefficient_each_step(world, tiny, rm, tmp_path):
    """kl_coef *= 1 + clip(KL / target - 1, -.2, .2) * (prompts of the step) / horizon; fixed without a target."""
    main(ppo_args(world, tiny, rm, tmp_path / "ad", "--max_steps", "3", "--kl_coef", "0.4", "--kl_target", "0.5",
                  "--kl_horizon", "10", "--learning_rate", "1e-2"))
    rows = _rows(tmp_path / "ad")
    assert rows[0]["kl_coef"] == pytest.approx(0.4)
    for prev, row in zip(rows, rows[1:]):
        err = max(-0.2, min(0.2, prev["kl"] / 0.5 - 1))
        assert row["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + err * 4 / 10), rel=1e-6)
    assert rows[1]["kl_coef"] != pytest.approx(0.4)
    main(ppo_args(world, tiny, rm, tmp_path / "fixed", "--max_steps", "2", "--kl_coef", "0.4"))
    assert [r["kl_coef"] for r in _rows(tmp_path / "fixed")] == [0.4, 0.4]


def test_the_k3_estimator_is_the_one_applied(world, tiny, rm, tmp_path, monkeypatch):
    """The logged KL is the mean over rollouts of the summed per-token estimate of --kl_estimator."""
    import training.ppo.trainer as trainer_mod

    real, kinds = trainer_mod.kl_estimate, []

    def spy(logp, ref_logp, kind="k1"):
        kinds.append(kind)
        return real(logp, ref_logp, kind)

    monkeypatch.setattr(trainer_mod, "kl_estimate", spy)
    main(ppo_args(world, tiny, rm, tmp_path / "k3", "--max_steps", "2", "--kl_estimator", "k3",
                  "--learning_rate", "1e-2"))
    assert kinds == ["k3", "k3"]
    assert _rows(tmp_path / "k3")[1]["kl"] > 0  # k3 >= 0 per token, > 0 once the actor moved


def test_the_kl_is_the_actors_log_prob_minus_the_references(world, tiny, rm, tmp_path, monkeypatch):
    """A reference whose log-prob is the actor's minus 1 at every response token: the k1 estimate log pi - log ref
    is +1 per token, so the logged KL (per rollout, summed over its tokens) is the mean response length. With the
    arguments swapped it was minus that, and every test passed (the first step's KL is 0 either way)."""
    from sft_helpers import on_reference_logprobs

    def minus_one(trainer, out, batch, suppressed):
        lp, mask, ent = out
        return lp - mask.to(lp.dtype), mask, ent
    on_reference_logprobs(monkeypatch, minus_one)
    main(ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "1", "--kl_estimator", "k1"))
    row = _rows(tmp_path / "out")[0]
    assert row["kl"] == pytest.approx(row["response_length"]) and row["kl"] >= 1


def test_the_first_update_sees_whitened_advantages_and_the_rollouts_own_values(world, tiny, rm, tmp_path,
                                                                                monkeypatch):
    """One minibatch of all 4 rollouts: the policy loss gets advantages of mean 0 and variance 1 over the response
    tokens (skipping the whitening passed every test), and the value loss's first call, before any critic update,
    gets the critic's values at the positions the rollout's old values were read at (reading them one position
    later in the update passed every test)."""
    import training.ppo.trainer as trainer_mod
    from training.advantages import masked_moments

    calls = {"policy": [], "value": []}
    real_pl, real_vl = trainer_mod.ppo_policy_loss, trainer_mod.ppo_value_loss

    def pl(logp, old_logp, adv, mask, clip_eps=0.2):
        calls["policy"].append((adv.detach().clone(), mask.clone()))
        return real_pl(logp, old_logp, adv, mask, clip_eps)

    def vl(values, old_values, returns, mask, clip_eps=0.2):
        calls["value"].append((values.detach().clone(), old_values.clone(), mask.clone()))
        return real_vl(values, old_values, returns, mask, clip_eps)

    monkeypatch.setattr(trainer_mod, "ppo_policy_loss", pl)
    monkeypatch.setattr(trainer_mod, "ppo_value_loss", vl)
    main(ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "4"))
    adv, mask = calls["policy"][0]
    mean, var = masked_moments(adv, mask.float())
    assert mask.sum() > 4 and float(mean) == pytest.approx(0.0, abs=1e-5) and float(var) == pytest.approx(1.0, rel=1e-4)
    values, old, mask = calls["value"][0]
    torch.testing.assert_close(values * mask, old * mask, rtol=0, atol=1e-5)


def test_gamma_and_lambda_reach_gae_each_as_itself(world, tiny, rm, tmp_path, monkeypatch):
    """--gamma 0.9 --lam 0.5 reach GAE as the discount and lambda (passed the other way round, every test passed: the
    defaults 1 and .95 differ, but no test looked)."""
    import inspect

    import training.ppo.trainer as trainer_mod

    seen, real = [], trainer_mod.gae

    def spy(*args, **kw):
        seen.append(inspect.signature(real).bind(*args, **kw).arguments)
        return real(*args, **kw)

    monkeypatch.setattr(trainer_mod, "gae", spy)
    main(ppo_args(world, tiny, rm, tmp_path / "out", "--max_steps", "1", "--gamma", "0.9", "--lam", "0.5"))
    assert [(a["gamma"], a["lam"]) for a in seen] == [(0.9, 0.5)]


@pytest.mark.parametrize("what", ["kl", "policy_loss", "value_loss", "critic_values"])
def test_a_non_finite_kl_or_loss_stops_and_keeps_the_last_checkpoint(world, tiny, rm, tmp_path, monkeypatch, what):
    """critic_values: the critic's per-token values of the rollouts (reported as a non-finite policy_loss before)."""
    import training.ppo.trainer as trainer_mod
    from training.rm.model import RewardModel

    state = {}
    real_exp = PPOTrainer.experience

    def experience(self, records, step, ckpt):
        state["step"] = step
        return real_exp(self, records, step, ckpt)

    def poison(real, when=lambda *a, **k: True):
        def poisoned(*a, **k):
            out = real(*a, **k)
            if state["step"] < 2 or not when(*a, **k):
                return out
            return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
        return poisoned

    monkeypatch.setattr(PPOTrainer, "experience", experience)
    if what == "critic_values":  # the critic's forward for values (per_token), not the reward model's score
        monkeypatch.setattr(RewardModel, "forward", poison(RewardModel.forward, lambda *a, per_token=False, **k:
                                                           per_token))
    else:
        name = {"kl": "kl_estimate", "policy_loss": "ppo_policy_loss", "value_loss": "ppo_value_loss"}[what]
        monkeypatch.setattr(trainer_mod, name, poison(getattr(trainer_mod, name)))
    out = tmp_path / what
    with pytest.raises(NonFiniteError, match=f"non-finite {what} at PPO step 2"):
        main(ppo_args(world, tiny, rm, out, "--max_steps", "3", "--save_steps", "1"))
    for engine in ("actor", "critic"):
        ckpt = out / "checkpoints" / engine
        assert (ckpt / "latest").read_text().strip() == "step1" and (ckpt / "step1").is_dir()
        assert not (ckpt / "step2").exists()
    assert not (out / "model.safetensors").exists()


def test_ppo_metrics_reach_tensorboard(world, tiny, rm, tmp_path):
    out = tmp_path / "tb"
    main(ppo_args(world, tiny, rm, out, "--max_steps", "2"))
    tb = tb_scalars(out)
    for key in ("reward/mean", "reward/std", "kl", "entropy", "clipfrac", "value_loss", "explained_variance",
                "response_length", "gen_tokens_per_s", "train_tokens_per_s"):
        assert [s for s, _ in tb[key]] == [1, 2], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in _rows(out)], rel=1e-5), key


def test_rollouts_are_one_kv_cached_generate_per_step(world, tiny, rm, tmp_path, monkeypatch):
    """Every prompt of a step's rollout batch in one generate call with the KV cache, never one at a time."""
    from transformers.generation.utils import GenerationMixin

    real, calls = GenerationMixin.generate, []

    def generate(self, *a, **k):
        calls.append((int(k["input_ids"].shape[0]), k.get("use_cache")))
        return real(self, *a, **k)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    main(ppo_args(world, tiny, rm, tmp_path / "g", "--max_steps", "2", "--rollout_batch_size", "4"))
    assert calls == [(4, True), (4, True)]
