"""ZeRO-3 builds models partitioned (transformers' from_pretrained under deepspeed.zero.Init): each rank holds its
share of the weights from the start, and DeepSpeed never moves a whole model onto every device. Built so, every
stage trains as a single rank with the whole batch does."""
import json
from pathlib import Path

import deepspeed
import pytest
import torch
from dist_dpo_driver import DIST_COMMON, dpo_args
from dist_partitioned_driver import LORA, RM, SFT
from safetensors.torch import load_file
from sft_helpers import run_two_ranks, sft_args, weights
from test_rm import rm_args

from training.config import DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs
from training.engine.strategy import Strategy
from training.model.builder import load_model_and_processor
from training.model.tiny_archs import SUPPORTED_TINY, make_tiny_checkpoint


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return Path(make_tiny_checkpoint("llava", tmp_path_factory.mktemp("llava")))


@pytest.mark.parametrize("arch", SUPPORTED_TINY)
def test_a_partitioned_build_holds_the_checkpoints_weights(arch, tmp_path):
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    strategy = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "fp32")
    zero3 = strategy.build_config()
    whole, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs())
    torch.manual_seed(0)
    part, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs(), zero3=zero3)
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4))  # the random state as a whole build leaves it (a reward head's init)
    params = dict(part.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values())
    assert all(p.numel() == 0 for p in params.values())  # nothing held whole: a world of one keeps its share apart
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in whole.named_parameters():
            assert torch.equal(params[name].data, p.data), name
    buffers = dict(part.named_buffers())
    assert set(buffers) == {n for n, _ in whole.named_buffers()}
    for name, b in whole.named_buffers():
        assert torch.equal(buffers[name], b), name
    again, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=path), LoraArgs())
    assert not any(hasattr(p, "ds_id") for p in again.parameters())  # the ZeRO-3 setting ends with the load
    # saved from its engine, it is the checkpoint again, by the checkpoint's names (a LLaVA came out renamed)
    strategy.save_hf(strategy.prepare(part, 2), None, tmp_path / "saved")
    saved, original = weights(tmp_path / "saved"), weights(Path(path))
    assert set(saved) == set(original)
    for name, v in original.items():
        assert torch.equal(saved[name], v), name


@pytest.mark.parametrize("frozen", [False, True])
def test_partitions_are_built_in_the_runs_precision(llava, frozen):
    """A bf16 run's frozen reference or reward model too (a config without the run's bf16 section made zero.Init
    build it in fp32)."""
    s = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "bf16")
    model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(llava), precision="bf16"), LoraArgs(),
                                           for_training=not frozen, zero3=s.build_config(frozen=frozen))
    assert {p.ds_tensor.dtype for p in model.parameters()} == {torch.bfloat16}
    engine = s.prepare_frozen(model) if frozen else s.prepare(model, 2)
    assert {p.ds_tensor.dtype for p in engine.module.parameters()} == {torch.bfloat16}


def test_the_tiny_vlm_is_built_whole_and_says_why(tiny, capsys):
    zero3 = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "fp32").build_config()
    model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), zero3=zero3)
    assert not any(hasattr(p, "ds_id") for p in model.parameters())
    assert "built whole on every rank, then partitioned: transformers' BiT" in capsys.readouterr().out


def test_every_stage_at_zero3_on_two_ranks_builds_partitioned_and_matches_one_rank(world, llava, tmp_path):
    run_two_ranks("dist_partitioned_driver.py", world, llava, tmp_path, timeout=900)
    for rank in (0, 1):
        loads = json.loads((tmp_path / f"loads_rank{rank}.json").read_text())
        # SFT, SFT-LoRA, DPO policy + reference, RM, PPO actor + reference + reward model + critic
        assert len(loads) == 9 and all(x["zero3"] for x in loads), loads
        assert all(x["partitioned"] == x["params"] > 0 for x in loads), loads
        assert [x["for_training"] for x in loads] == [True, True, True, False, True, True, False, False, True]

    one = tmp_path / "one"
    from training.dpo.main import main as dpo
    from training.rm.main import main as rm
    from training.sft.main import main as sft
    single = ("--per_device_train_batch_size", "4")
    sft(sft_args(world, llava, one / "sft", *SFT, *single))
    sft(sft_args(world, llava, one / "sft_lora", *SFT, *LORA, *single))
    dpo(dpo_args(world, llava, one / "dpo", *DIST_COMMON, *single))
    rm(rm_args(world, llava, one / "rm", *RM, *single))
    init = weights(llava)
    for name, files in (("sft", ["model.safetensors"]), ("dpo", ["model.safetensors"]),
                        ("rm", ["model.safetensors", "value_head.safetensors"]),
                        ("sft_lora", ["adapter/adapter_model.safetensors"])):
        want = {k: v for f in files for k, v in load_file(str(one / name / f)).items()}
        got = {k: v for f in files for k, v in load_file(str(tmp_path / name / f)).items()}
        assert set(got) == set(want), name
        moved = [k for k in want if k in init and not torch.equal(want[k], init[k])] + \
            [k for k in want if "lora_B" in k and float(want[k].abs().max()) > 0]
        assert moved, name  # the steps changed something
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    ppo_rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo_rows and "value_loss" in ppo_rows[-1]
    assert abs(ppo_rows[0]["kl"]) < 1e-5  # before any update the partitioned actor and reference are one model
    assert all(torch.isfinite(torch.tensor(float(v))) for r in ppo_rows for v in r.values())
    assert (tmp_path / "ppo" / "model.safetensors").is_file()


def test_a_critic_called_through_forward_gets_zero3_prefetching(llava):
    """DeepSpeed starts each step of its ZeRO-3 parameter prefetching at the model's forward: the PPO critic, called
    through RewardModel.values, never completed a trace (no prefetch); per_token=True gives the values by forward."""
    from training.rm.model import RewardModel
    s = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "fp32")
    backbone, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(llava)), LoraArgs(), zero3=s.build_config())
    critic = s.prepare(RewardModel(backbone), 10)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    mask = (ids > 0).long()
    for _ in range(3):
        values = critic(ids, mask, per_token=True)
        critic.backward(values.pow(2).mean())
        critic.step()
    assert critic.optimizer.parameter_offload.get_param_coordinator().is_complete_trace()
    with torch.no_grad():
        values, by_method, rewards = critic(ids, mask, per_token=True), critic.module.values(ids, mask), critic(ids, mask)
    assert values.shape == (2, 5) and torch.equal(values, by_method)
    # each row's last non-pad token; the head runs on the two gathered states rather than on all ten (ulp apart)
    torch.testing.assert_close(rewards, values[[0, 1], [4, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_generation_gathers_the_whole_model_once_and_training_goes_on(llava, lora, monkeypatch):
    """PPO's rollouts at ZeRO-3 (Strategy.whole_for_generation, --gather_for_generation): no per-module fetch while
    generating, the same tokens as with ZeRO's per-module gathers, and the hooks back after it: the next training
    step (which needs them to gather the partitioned weights) gives what it gives after a hooked generation."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator
    import numpy as np
    from PIL import Image

    fetches, fetch = [], Coordinator.fetch_sub_module

    def counted(self, *a, **k):
        fetches.append(1)
        return fetch(self, *a, **k)

    monkeypatch.setattr(Coordinator, "fetch_sub_module", counted)

    def run(gather: bool):
        s = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(optimizer="sgd", learning_rate=0.5), "fp32")
        torch.manual_seed(0)
        model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(llava)),
                                                     LoraArgs(lora_r=4, lora_dropout=0) if lora else LoraArgs(),
                                                     zero3=s.build_config())
        engine = s.prepare(model, 10)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        b = dict(proc(text=[f"{arch.image_token} a red circle"], images=[image], return_tensors="pt"))
        fetches.clear()
        with s.whole_for_generation(engine, gather) as m:
            m.eval()
            out = m.generate(**b, do_sample=False, max_new_tokens=6, pad_token_id=proc.tokenizer.pad_token_id)
        n = len(fetches)
        engine.train()
        losses = []
        for _ in range(2):
            loss = engine(**b, labels=b["input_ids"]).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return out, n, len(fetches) - n, losses

    if lora:  # an error while generating: the hooks are back all the same (DeepSpeed's own helper left them off)
        s = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(optimizer="sgd"), "fp32")
        model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(llava)), LoraArgs(), zero3=s.build_config())
        engine = s.prepare(model, 10)
        before = len(engine.optimizer.parameter_offload.forward_hooks)
        with pytest.raises(RuntimeError, match="generation failed"):
            with s.whole_for_generation(engine):
                raise RuntimeError("generation failed")
        assert len(engine.optimizer.parameter_offload.forward_hooks) == before > 0
    (out, n, n_train, losses), (out_hooked, n_hooked, _, losses_hooked) = run(True), run(False)
    assert n == 0 and n_hooked > 6  # one fetch per module per token with ZeRO's hooks
    assert n_train > 0  # the hooks are back: training fetches (and releases) each module's weights again
    assert torch.equal(out, out_hooked)
    assert losses == pytest.approx(losses_hooked, rel=1e-6) and losses[1] < losses[0]


def test_a_lora_save_at_zero3_gathers_the_trained_weights_only(llava, tmp_path, monkeypatch):
    """Saving a LoRA model at ZeRO-3 gathered every parameter at once: the whole base on every device at the end of
    a run partitioned because the model does not fit one. Only the trained weights are written, and gathered."""
    strategy = Strategy(DeepSpeedArgs(zero_stage=3), OptimArgs(), "fp32")
    model, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(llava)), LoraArgs(lora_r=4),
                                                   zero3=strategy.build_config())
    engine = strategy.prepare(model, 1)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(trained) < len(list(model.parameters()))
    gathered, real = [], deepspeed.zero.GatheredParameters

    def recording(params, *a, **k):
        params = [params] if isinstance(params, torch.nn.Parameter) else list(params)
        gathered.append(len(params))
        return real(params, *a, **k)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    strategy.save_hf(engine, processor, tmp_path / "out")
    assert gathered == [len(trained)]
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    with deepspeed.zero.GatheredParameters(trained):
        held = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(held) and all(v.numel() > 0 for v in saved.values())
    for name, value in saved.items():
        match = [v for n, v in held.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        torch.testing.assert_close(value, match[0])
