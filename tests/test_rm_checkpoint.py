"""Reward-model checkpoints: the value head must fit its backbone and lie in the checkpoint; a model saved over a
reward model is no reward model."""
import json

import pytest
import torch

from training.config import LoraArgs, ModelArgs
from training.rm.model import RewardModel, load_reward_model


def test_a_value_head_that_does_not_fit_the_backbone_names_its_file(tiny, tmp_path):
    """A head of another width (a LoRA reward model whose base was retrained at another size, or another model's
    head file) stopped in torch's "Error(s) in loading state_dict for Linear", naming neither the file nor the
    sizes. The error names the head file, what the backbone needs and what the file holds."""
    from safetensors.torch import save_file

    from training.model.builder import load_model_and_processor, save_model
    backbone, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs())
    rm = RewardModel(backbone)
    save_model(rm, processor, tmp_path / "rm")
    head = tmp_path / "rm" / "value_head.safetensors"
    hidden = rm.value_head.in_features
    for bad in ({"weight": torch.zeros(1, hidden + 3), "bias": torch.zeros(1)}, {"w": torch.zeros(1, hidden)}):
        save_file(bad, str(head))
        with pytest.raises(ValueError) as e:
            load_reward_model(tmp_path / "rm")
        assert str(head) in str(e.value) and f"[1, {hidden}]" in str(e.value) and next(iter(bad)) in str(e.value)


def test_a_head_file_named_outside_the_checkpoint_is_refused(tiny, tmp_path):
    """reward_model.json names the head file; a name with a folder part ("../x") was read from outside the
    checkpoint, and merge_lora copied it there to the same place beside the merged folder (a write outside it).
    The name must be a file of the checkpoint itself."""
    from training.model.builder import load_model_and_processor, save_model
    from training.model.merge_lora import merge_lora
    backbone, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(lora_r=4))
    save_model(RewardModel(backbone), processor, tmp_path / "runs" / "rm")
    info_file = tmp_path / "runs" / "rm" / "reward_model.json"
    info = json.loads(info_file.read_text())
    (tmp_path / "runs" / "outside.safetensors").write_bytes((tmp_path / "runs" / "rm" / info["head_file"]).read_bytes())
    info_file.write_text(json.dumps({**info, "head_file": "../outside.safetensors"}))
    with pytest.raises(ValueError, match="reward_model.json: head_file '../outside.safetensors'"):
        load_reward_model(tmp_path / "runs" / "rm")
    with pytest.raises(ValueError, match="head_file"):
        merge_lora(tmp_path / "runs" / "rm", tmp_path / "merged" / "rm")
    assert not (tmp_path / "merged" / "outside.safetensors").exists()


def test_a_model_saved_over_a_reward_model_is_no_reward_model(tiny, tmp_path):
    """A policy (SFT, DPO, a merge) saved into a folder that held a reward model left its value head and
    reward_model.json there: the folder still read as a reward model, the new backbone under the old head, with no
    word. A save of a model that is not a reward model removes them; a reward model's save writes them anew."""
    from training.model.builder import load_model_and_processor, save_model
    from training.rm.model import is_reward_model
    backbone, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs())
    save_model(RewardModel(backbone), processor, tmp_path / "out")
    assert is_reward_model(tmp_path / "out")
    save_model(RewardModel(backbone), processor, tmp_path / "out")  # saved again: still one
    assert is_reward_model(tmp_path / "out") and (tmp_path / "out" / "value_head.safetensors").is_file()
    save_model(backbone, processor, tmp_path / "out")
    assert not is_reward_model(tmp_path / "out") and not (tmp_path / "out" / "value_head.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="not a reward model checkpoint"):
        load_reward_model(tmp_path / "out")


def test_a_bf16_reward_model_reloaded_scores_as_at_the_end_of_training(world, tiny, tmp_path):
    """Trained at --precision bf16, the reward model's head ran in bf16 (DeepSpeed casts the whole model); reloaded
    at bf16 for best-of-n, or for PPO at ZeRO 0-2 (no DeepSpeed engine around it), its head stayed fp32, so every
    reward differed from the held-out rewards of the training run's final evaluation (by up to 4e-3 here) and from
    those of a PPO run at ZeRO-3. The head now takes the backbone's precision as it loads."""
    from test_rm import _scores, rm_args

    from training.rm.main import main
    out = tmp_path / "rm"
    main(rm_args(world, tiny, out, "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate",
                 "3e-3", "--precision", "bf16"))
    saved = torch.tensor(json.loads((out / "eval_rewards.json").read_text())["ranked_rewards"], dtype=torch.float64)
    rm, processor, arch = load_reward_model(out, ModelArgs(precision="bf16"))
    assert rm.value_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_scores(rm, processor, arch, world).double(), saved.flatten(), rtol=0, atol=1e-6)
