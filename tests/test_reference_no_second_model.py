"""With LoRA the reference is the policy with its adapters off: no second copy of the model is built (the issue's
"no second model in memory"), for DPO's live reference and PPO's. The runs' numbers equal those of a frozen copy
(test_dpo.py, test_ppo.py), so only counting what is loaded tells the two apart."""
import pytest
from dist_dpo_driver import dpo_args
from sft_helpers import make_reward_model, ppo_args


@pytest.fixture
def loads(monkeypatch):
    """Every model the builder makes: (checkpoint, for_training)."""
    import training.model.builder as builder

    real, seen = builder.load_model_and_processor, []

    def spy(margs, *a, for_training=True, **k):
        seen.append((margs.from_checkpoint, for_training))
        return real(margs, *a, for_training=for_training, **k)

    monkeypatch.setattr(builder, "load_model_and_processor", spy)
    return seen


def test_dpo_lora_live_reference_builds_no_second_model(world, tiny, tmp_path, loads):
    from training.dpo.main import main

    main(dpo_args(world, tiny, tmp_path / "dpo", "--lora_r", "4", "--lora_dropout", "0", "--max_steps", "1",
                  "--per_device_train_batch_size", "2", "--no-precompute_ref"))
    assert loads == [(str(tiny), True)]
    loads.clear()  # without LoRA the live reference is a frozen copy: the spy sees it
    main(dpo_args(world, tiny, tmp_path / "full", "--max_steps", "1", "--per_device_train_batch_size", "2",
                  "--no-precompute_ref"))
    assert loads == [(str(tiny), True), (str(tiny), False)]


def test_ppo_lora_reference_builds_no_second_model(world, tiny, tmp_path, loads):
    from training.ppo.main import main

    rm = make_reward_model(tiny, tmp_path / "rm")
    loads.clear()
    main(ppo_args(world, tiny, rm, tmp_path / "ppo", "--max_steps", "1", "--lora_r", "4", "--lora_dropout", "0"))
    # the actor, the frozen reward model and the critic (from the reward model): no frozen copy of the actor
    assert loads == [(str(tiny), True), (str(rm), False), (str(rm), True)]
