"""PPO's optimizer step is one mean over the response tokens of all its micro-batches: rollout batch 4 trained as
one micro-batch of 4 equals two micro-batches of 2 accumulated (actor and critic), with responses of unequal lengths."""
import json

import pytest
import torch
from sft_helpers import make_reward_model, ppo_args, weights

import training.ppo.rollout as rollout
import training.ppo.trainer as trainer
from training.ppo.main import main


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return make_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_over_responses_of_unequal_length_equals_one_batch(world, tiny, rm, tmp_path, monkeypatch):
    """A micro-batch's own token mean, averaged over the step's micro-batches, weighed a token of a short response
    more than one of a long response in another micro-batch."""
    real = rollout.stop_and_never

    def many_stops(model, tok, end_of_turn_id):  # a third of the vocabulary ends a response: lengths differ
        eos, never = real(model, tok, end_of_turn_id)
        return list(dict.fromkeys([*eos, *(t for t in range(0, len(tok), 3) if t not in never)])), never
    monkeypatch.setattr(rollout, "stop_and_never", many_stops)
    lengths, generate = [], trainer.generate_rollouts

    def recorded(*args, **kwargs):
        ro = generate(*args, **kwargs)
        lengths.extend(ro.lengths.tolist())
        return ro
    monkeypatch.setattr(trainer, "generate_rollouts", recorded)
    common = ("--max_steps", "2", "--optimizer", "sgd", "--learning_rate", "0.5", "--critic_learning_rate", "0.5",
              "--temperature", "1.5", "--max_new_tokens", "12")
    main(ppo_args(world, tiny, rm, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    main(ppo_args(world, tiny, rm, tmp_path / "two", *common, "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "2"))
    a, b, init = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tiny)
    assert sum(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # the actor moved
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for x, y in zip(ra, rb):  # the same rollouts; step 2's advantages from the critic step 1 trained
        assert x["response_length"] == y["response_length"] and x["reward/mean"] == y["reward/mean"]
        assert x["explained_variance"] == pytest.approx(y["explained_variance"], rel=1e-4, abs=1e-6)
    assert len(set(lengths)) > 2, lengths
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_run_resumed_after_its_first_step_logs_and_ends_as_an_uninterrupted_one(world, tiny, rm, tmp_path):
    """Three steps, cut after the first: the critic's AdamW state from step 1 shapes its step 2 update, whose values
    are step 3's advantages; the adaptive KL coefficient and the reward statistics carry over too."""
    common = ("--max_steps", "3", "--kl_target", "1", "--kl_horizon", "10", "--critic_learning_rate", "1e-2",
              "--learning_rate", "1e-3")
    main(ppo_args(world, tiny, rm, tmp_path / "full", *common))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--save_steps", "1", "--stop_after_steps", "1"))
    main(ppo_args(world, tiny, rm, tmp_path / "cut", *common, "--resume"))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full] == [1, 2, 3]
    for x, y in zip(full, cut):
        for k in x:
            if not k.endswith("_per_s") and k not in ("time", "elapsed"):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
