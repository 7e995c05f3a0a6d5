"""The DeepSpeed configuration a run gets, with and without a user's --deepspeed_config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import DeepSpeedArgs, OptimArgs
from training.engine.optimizer import decayed_parameter_names
from training.engine.strategy import Strategy


def _strategy(tmp_path, user: dict | None, precision="fp32", **ds):
    path = ""
    if user is not None:
        path = str(tmp_path / "ds.json")
        (tmp_path / "ds.json").write_text(json.dumps(user))
    return Strategy(DeepSpeedArgs(deepspeed_config=path, **ds), OptimArgs(per_device_train_batch_size=4), precision)


def test_a_user_config_wins_where_it_sets_values_and_ours_fill_the_rest(tmp_path):
    user = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.3,
            "communication_data_type": "fp32"}
    s = _strategy(tmp_path, user)
    cfg = s.config()
    assert s.ds.zero_stage == 2  # the run's code (saving, gathering) follows the file's stage
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True} and cfg["gradient_clipping"] == 0.3
    assert cfg["communication_data_type"] == "fp32" and cfg["train_micro_batch_size_per_gpu"] == 4
    plain = _strategy(tmp_path, None).config()
    assert plain["zero_optimization"] == {"stage": 0} and plain["gradient_clipping"] == 1.0



def test_a_user_configs_bf16_section_under_its_old_name_is_followed(tmp_path):
    """DeepSpeed reads "bfloat16" (its old name) only when there is no "bf16": --precision bf16 added "bf16", so the
    file's bfloat16 settings (here immediate_grad_update) were dropped without a word."""
    user = {"bfloat16": {"enabled": True, "immediate_grad_update": True}}
    cfg = _strategy(tmp_path, user, "bf16").config()
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": True} and "bfloat16" not in cfg
    from deepspeed.runtime.precision_config import get_bfloat16_config
    assert get_bfloat16_config(cfg).immediate_grad_update

@pytest.mark.parametrize("user, kw, match", [
    ({"zero_optimization": {"stage": 2}}, {"zero_stage": 3}, "ZeRO stage 2, but --zero_stage 3"),
    ({"fp16": {"enabled": True}}, {}, "enables fp16, but --precision is fp32"),
    ({"bf16": {"enabled": True}}, {}, "enables bf16, but --precision is fp32"),
    ({"train_micro_batch_size_per_gpu": 16}, {}, "differs from the run's 4"),
    # text, not a number: "4 differs from the run's 4" read as nonsense
    ({"train_micro_batch_size_per_gpu": "4"}, {}, "train_micro_batch_size_per_gpu '4' differs from the run's 4"),
    # these two were overwritten without a word by the flags' values
    ({"train_batch_size": 64}, {}, "train_batch_size 64 differs from the run's 4"),
    ({"fp16": {"enabled": False}}, {"precision": "fp16"}, "disables fp16, but --precision is fp16"),
])
def test_a_user_config_contradicting_a_flag_stops(tmp_path, user, kw, match, monkeypatch):
    from deepspeed.accelerator import get_accelerator
    # the CPU accelerator's fp16 support follows the CPU's flags (none on some machines of this kind, where --precision
    # fp16 is refused before the config is read): taken as supported, so the config's check is what is tested
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    precision = kw.pop("precision", "fp32")
    with pytest.raises(SystemExit, match=match):
        _strategy(tmp_path, user, precision, **kw)


def test_auto_values_of_a_user_config_are_filled_by_the_flags(tmp_path):
    """Hugging Face's "auto" (the trainer fills it in): passed on, bf16 "auto" ran a --precision bf16 run in fp32,
    gradient_clipping "auto" failed at the first step, and fp16 "auto" beside --precision bf16 was refused."""
    user = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_batch_size": "auto", "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}
    s = _strategy(tmp_path, user, "bf16")
    cfg = s.config()
    assert cfg["bf16"] == {"enabled": True} and not cfg["fp16"].get("enabled") and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 1} and cfg["train_batch_size"] == 4
    engine = s.prepare(torch.nn.Linear(2, 2), 10)
    assert engine.bfloat16_enabled() and not engine.fp16_enabled() and engine.gradient_clipping() == 1.0
    assert not _strategy(tmp_path, {"bf16": {"enabled": "auto"}}).config()["bf16"].get("enabled")  # fp32


@pytest.mark.parametrize("user, match", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type Lamb"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, "scheduler.type WarmupLR"),
])
def test_optimizer_and_scheduler_settings_of_a_user_config_stop(tmp_path, user, match):
    """DeepSpeed runs the optimizer and schedule it is given over its config's: a file's lr 1e-5 ran at 1e-3."""
    with pytest.raises(SystemExit, match=match):
        _strategy(tmp_path, user)
    hf_style = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    assert _strategy(tmp_path, hf_style).config()["optimizer"] == {"type": "AdamW", "params": {}}


def test_offload_needs_a_zero_stage_and_adam(tmp_path):
    """At stage 0 the parameters stay where they train: CPU Adam asserted on GPU parameters at the first step."""
    with pytest.raises(SystemExit, match="needs --zero_stage 1, 2 or 3"):
        _strategy(tmp_path, None, offload=True)
    with pytest.raises(SystemExit, match="drop --optimizer sgd"):
        Strategy(DeepSpeedArgs(offload=True, zero_stage=2), OptimArgs(optimizer="sgd"))
    s = _strategy(tmp_path, {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 10}}, offload=True)
    # a frozen model (reference, reward model) is partitioned and offloaded like the trained one
    assert s.frozen_config()["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"},
                                                      "stage3_prefetch_bucket_size": 10}
    # a user's NVMe parameter offload: frozen engines sharing its swap folder deleted each other's files
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}}
    assert _strategy(tmp_path, nvme).frozen_config()["zero_optimization"] == {"stage": 3,
                                                                             "offload_param": {"device": "cpu"}}


def test_nvme_offload_serves_one_trained_model(tmp_path, monkeypatch):
    """PPO's critic engine cleared the swap folder holding the actor's swapped-out weights (DeepSpeed removes it as an
    engine starts); a second trained model with NVMe offload stops before that."""
    import deepspeed
    import torch
    monkeypatch.setattr(deepspeed, "initialize", lambda model, **kw: (model, None, None, None))
    for where in ("offload_param", "offload_optimizer"):
        s = _strategy(tmp_path, {"zero_optimization": {"stage": 3, where: {"device": "nvme", "nvme_path": "/x"}}})
        s.prepare(torch.nn.Linear(2, 2), 10)  # the actor
        with pytest.raises(SystemExit, match=rf"NVMe offload \({where}\) serves one trained model"):
            s.prepare(torch.nn.Linear(2, 2), 10)  # the critic
    plain = _strategy(tmp_path, None, zero_stage=3)
    plain.prepare(torch.nn.Linear(2, 2), 10)
    plain.prepare(torch.nn.Linear(2, 2), 10)  # no swap folder: any number of models


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_a_user_configs_optimizer_offload_trains_with_cpu_adam_and_offloads_nothing_else(tmp_path, monkeypatch,
                                                                                       device):
    """A user config's NVMe optimizer offload got torch's AdamW (DeepSpeed refused it as the engine started); its CPU
    optimizer offload turned --offload on, which at stage 3 offloaded the parameters too."""
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    got = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, config, **kw: (
        got.update(opt=optimizer, config=config), None, None, None))
    zero = {"stage": 3, "offload_optimizer": {"device": device, "nvme_path": str(tmp_path)}}
    _strategy(tmp_path, {"zero_optimization": zero}).prepare(torch.nn.Linear(2, 2), 10)
    assert isinstance(got["opt"], DeepSpeedCPUAdam) and got["config"]["zero_optimization"] == {
        **zero, "stage3_gather_16bit_weights_on_model_save": True}
    with pytest.raises(SystemExit, match="drop --optimizer sgd"):
        Strategy(DeepSpeedArgs(deepspeed_config=str(tmp_path / "ds.json")), OptimArgs(optimizer="sgd"))


def test_adamw_is_torchs_fused_kernel_where_it_runs(tmp_path, monkeypatch):
    """The per-parameter AdamW loop (torch's default on the CPU) against transformers' Trainer (TRL), which uses the
    fused kernel; the step is the same update (to fp32 rounding), SGD and CPU offload keep their own."""
    import deepspeed
    got = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, **kw: (got.setdefault("opt", optimizer),
                                                                               None, None, None))
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    _strategy(tmp_path, None).prepare(a, 10)
    fused = got.pop("opt")
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    loop = torch.optim.AdamW(b.parameters(), lr=fused.defaults["lr"], weight_decay=0.0)  # the groups' (default 0)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and not torch.allclose(a.weight, start, atol=1e-4)
    Strategy(DeepSpeedArgs(), OptimArgs(optimizer="sgd")).prepare(torch.nn.Linear(2, 2), 10)
    assert isinstance(got.pop("opt"), torch.optim.SGD)


def test_zero_buckets_are_no_larger_than_the_trained_weights(tmp_path):
    """ZeRO-2 kept a 5e8-element bucket (1 GB in fp16 per device) for LoRA's few million weights."""
    lora = _strategy(tmp_path, None, zero_stage=2).config(n_trainable=63_000_001)["zero_optimization"]
    assert lora["reduce_bucket_size"] == lora["allgather_bucket_size"] == 63_000_576  # a multiple of 1024
    big = _strategy(tmp_path, None, zero_stage=1).config(n_trainable=7_000_000_000)["zero_optimization"]
    assert big["reduce_bucket_size"] == 500_000_000
    user = _strategy(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}})
    assert user.config(n_trainable=63_000_000)["zero_optimization"]["reduce_bucket_size"] == 1000  # the user's wins
    assert "reduce_bucket_size" not in _strategy(tmp_path, None).config(n_trainable=10)["zero_optimization"]


def test_a_user_config_agreeing_with_the_flags_runs(tmp_path):
    user = {"train_batch_size": 4, "gradient_accumulation_steps": "auto", "fp16": {"enabled": False},
            "bf16": {"enabled": False}}
    assert _strategy(tmp_path, user).config()["train_batch_size"] == 4


def test_each_rank_sets_its_device_before_anything_is_placed(tmp_path):
    """bitsandbytes puts a 4-bit model on the current device: unless each rank sets its own (LOCAL_RANK) first,
    every rank's went to GPU 0. Checked with the accelerator's set_device recorded, in a fresh process."""
    code = """
import os
from deepspeed.accelerator import get_accelerator
import deepspeed
acc, seen = get_accelerator(), []
acc.set_device = lambda i: seen.append(("set_device", i))
init = deepspeed.init_distributed
deepspeed.init_distributed = lambda *a, **k: (seen.append(("init_distributed",)), init(*a, **k))[1]
from training.config import DeepSpeedArgs, OptimArgs
from training.engine.strategy import Strategy
os.environ.update(RANK="0", LOCAL_RANK="1", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
Strategy(DeepSpeedArgs(), OptimArgs())
print(seen)
"""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[('set_device', 1), ('init_distributed',)]"


def test_the_finite_check_reads_held_values_not_partition_padding(tmp_path):
    """DeepSpeed pads the last ranks' ZeRO-3 shares with uninitialised memory (NaN at times: a run on mllama, whose
    one-element gates are all padding on rank 1, stopped at random before a save)."""
    from training.engine.strategy import NonFiniteError, _held_values

    def param(numel, part):
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_numel, p.ds_tensor = numel, torch.tensor(part)
        return p
    nan = float("nan")
    assert _held_values(param(1, [nan]), rank=1).numel() == 0  # all padding
    assert _held_values(param(5, [1.0, 2.0, nan]), rank=1).tolist() == [1.0, 2.0]
    assert _held_values(param(5, [1.0, 2.0, 3.0]), rank=0).tolist() == [1.0, 2.0, 3.0]
    s = _strategy(tmp_path, None)  # a world of one: rank 0
    module = torch.nn.Module()
    module.register_parameter("a", param(1, [1.0, nan]))
    s.require_finite_weights(module, tmp_path / "out")  # the NaN is padding
    # a frozen weight is not read (no step changes it: a LoRA run's whole base was read every PPO step)
    module.register_parameter("frozen", torch.nn.Parameter(torch.tensor([nan]), requires_grad=False))
    s.require_finite_weights(module, tmp_path / "out")
    module.register_parameter("b", param(1, [nan, 1.0]))
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        s.require_finite_weights(module, tmp_path / "out")


def test_weight_decay_spares_biases_and_norms_and_the_schedule_is_transformers(tmp_path, monkeypatch):
    """One group decayed every trainable tensor, biases and norm gains too (transformers' Trainer and
    Vision-LLM-Alignment exempt them); the warm-up reached its peak one step early (s+1)/w, 'constant' warmed up,
    and warmup_ratio rounded down."""
    import deepspeed
    import transformers
    got = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda model, optimizer, lr_scheduler, **kw: (
        got.update(opt=optimizer, sched=lr_scheduler), None, None, None))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    s = Strategy(DeepSpeedArgs(), OptimArgs(weight_decay=0.1, num_warmup_steps=3, lr_scheduler_type="linear"))
    s.prepare(model, 10)
    decay = {id(p): g["weight_decay"] for g in got["opt"].param_groups for p in g["params"]}
    assert decay == {id(model[0].weight): 0.1, id(model[2].weight): 0.1, id(model[0].bias): 0.0,
                     id(model[1].weight): 0.0, id(model[1].bias): 0.0}
    lrs = []
    for _ in range(10):
        lrs.append(got["sched"].get_last_lr()[0])
        got["opt"].step()
        got["sched"].step()
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=got["opt"].defaults["lr"])
    hf = transformers.get_linear_schedule_with_warmup(ref, 3, 10)
    want = []
    for _ in range(10):
        want.append(hf.get_last_lr()[0])
        ref.step()
        hf.step()
    assert lrs == pytest.approx(want) and lrs[0] == 0.0
    from transformers import LlavaForConditionalGeneration, Trainer

    from training.model import tiny
    vlm = LlavaForConditionalGeneration(tiny.tiny_config(tiny.build_tokenizer()))  # transformers' rule, name for name
    assert decayed_parameter_names(vlm) == set(Trainer.get_decay_parameter_names(None, vlm))
    with pytest.raises(SystemExit, match="constant takes no warm-up"):
        Strategy(DeepSpeedArgs(), OptimArgs(num_warmup_steps=2, lr_scheduler_type="constant")).prepare(model, 10)
    from training.config import parse_config  # and as the options are read, before a stage loads its models
    with pytest.raises(SystemExit, match="constant takes no warm-up"):
        parse_config({"optim": OptimArgs}, ["--lr_scheduler_type", "constant", "--warmup_ratio", "0.1"])
    Strategy(DeepSpeedArgs(), OptimArgs(warmup_ratio=0.1, lr_scheduler_type="constant_with_warmup")).prepare(model, 35)
    lrs = []
    for _ in range(5):
        lrs.append(got["sched"].get_last_lr()[0])
        got["opt"].step()
        got["sched"].step()
    peak = got["opt"].defaults["lr"]
    assert lrs == pytest.approx([0.0, peak / 4, peak / 2, 3 * peak / 4, peak])  # ceil(0.1 x 35) = 4 warm-up steps


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (1, 1), (5, 5)])
def test_schedules_are_transformers_get_scheduler_at_every_step(kind, warmup, total):
    import transformers

    from training.engine.optimizer import schedule
    ours_opt, hf_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    o = OptimArgs(lr_scheduler_type=kind, num_warmup_steps=warmup)
    if kind == "constant" and warmup:  # transformers' constant ignores a warm-up; ours refuses it
        with pytest.raises(SystemExit, match="constant takes no warm-up"):
            schedule(ours_opt, o, total)
        return
    ours = schedule(ours_opt, o, total)
    hf = transformers.get_scheduler(kind, hf_opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 2):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr(), abs=1e-12)
        for o, sc in ((ours_opt, ours), (hf_opt, hf)):
            o.step()
            sc.step()


@pytest.mark.parametrize("text, match", [('{"zero_optimization": {"stage": 2},}', "line 1 column 36"),
                                         ("[1]", "not a JSON object")])
def test_a_user_config_that_is_not_a_json_object_stops_naming_the_file(tmp_path, text, match):
    """A trailing comma stopped the run with a bare JSONDecodeError, a list with AttributeError: 'list' object has
    no attribute 'items'; neither named the file."""
    (tmp_path / "ds.json").write_text(text)
    with pytest.raises(SystemExit, match=rf"--deepspeed_config {tmp_path / 'ds.json'}: .*{match}"):
        Strategy(DeepSpeedArgs(deepspeed_config=str(tmp_path / "ds.json")), OptimArgs())


@pytest.mark.parametrize("zero", [None, [2], {"stage": "three"}, {"stage": 2.5}, {"stage": True}, {"stage": 7}])
def test_a_user_config_whose_zero_section_is_malformed_stops_naming_it(tmp_path, zero):
    """A zero_optimization that was no object stopped on a bare AttributeError, a stage "three" on a bare ValueError;
    a stage 2.5 ran as 2, true as 1, and 7 was taken for the run's stage."""
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": zero}))
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'ds.json'}: zero_optimization"):
        Strategy(DeepSpeedArgs(deepspeed_config=str(tmp_path / "ds.json")), OptimArgs())


@pytest.mark.parametrize("section, value", [("scheduler", [1]), ("optimizer", "adam"), ("optimizer", {"params": 3})])
def test_a_user_config_whose_optimizer_or_scheduler_is_no_object_stops_naming_it(tmp_path, section, value):
    """A list or text where the optimizer or scheduler section goes stopped on a bare AttributeError ('list' object
    has no attribute 'get'), naming no file."""
    (tmp_path / "ds.json").write_text(json.dumps({section: value}))
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'ds.json'}: {section}"):
        Strategy(DeepSpeedArgs(deepspeed_config=str(tmp_path / "ds.json")), OptimArgs())
