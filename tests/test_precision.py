"""bf16 on the tiny default VLM: its DPT-hybrid tower does not cast pixel inputs itself (CLIP does), so
before the builder's cast hook every stage failed at --precision bf16 with a dtype mismatch."""
import json

import torch
from sft_helpers import sft_args

from training.config import LoraArgs, ModelArgs
from training.model.builder import inference_device, load_model_and_processor
from training.predict.main import main as predict
from training.sft.main import main as sft


def test_sft_stage_trains_in_bf16(world, tiny, tmp_path):
    r = sft(sft_args(world, tiny, tmp_path / "sft", "--max_steps", "2", "--precision", "bf16"))
    assert len(r["history"]) == 2 and all(h["loss"] == h["loss"] and h["loss"] > 0 for h in r["history"])


def test_vision_tower_gets_its_own_dtype(world, tiny):
    from PIL import Image
    model, proc, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny), precision="bf16"), LoraArgs(),
                                              for_training=False)
    image = Image.open(next((world / "images").iterdir())).convert("RGB")
    pixels = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.dtype == torch.float32
    seen = []
    tower = model.model.vision_tower
    tower.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args or (kwargs["pixel_values"],))[0].dtype),
                                    with_kwargs=True)
    with torch.no_grad():
        out = tower(pixels).last_hidden_state
    assert seen == [torch.bfloat16]  # cast by the builder's hook, registered before this one
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_predict_in_bf16_and_auto_device(world, tiny, tmp_path):
    import os
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    assert inference_device("auto", "auto") == (("cuda", "bf16") if gpu and torch.cuda.is_bf16_supported() else
                                              ("cuda", "fp16") if gpu else ("cpu", "fp32"))
    out = predict(["--model_path", str(tiny), "--data_path", str(world / "ppo_prompts.json"), "--image_folder",
                   str(world / "images"), "--output_file", str(tmp_path / "a.jsonl"), "--max_new_tokens", "6",
                   "--precision", "bf16", "--no-progress"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(isinstance(r["text"], str) for r in rows)


def test_a_precision_the_accelerator_lacks_stops_with_a_clear_message(world, tiny, tmp_path, monkeypatch):
    import pytest
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)  # the CPU accelerator's answer
    with pytest.raises(SystemExit, match="--precision fp16: DeepSpeed's .* accelerator does not support it"):
        sft(sft_args(world, tiny, tmp_path / "fp16", "--precision", "fp16", "--max_steps", "1"))


def test_auto_precision_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """A T4 (compute capability 7.5) reports bf16 as supported, emulated: "auto" took bf16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, want in (((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert inference_device("cuda", "auto") == ("cuda", want)


def test_fp16_at_zero0_is_refused_and_trains_at_zero1(monkeypatch):
    """DeepSpeed scales the loss only for a ZeRO optimizer but its stage-0 FP16 optimizer unscales the gradients:
    fp16 at stage 0 moved the weights by 0 where fp32 moved them by ~lr (Adam's first step); refused now. At
    stage 1 fp16 trains like fp32. (DeepSpeed's CPU accelerator reports fp16 support by the CPU's flags: no on an AMD
    EPYC of this machine kind, which the run refuses first; the accelerator is taken to support it here, as a GPU's.)"""
    import pytest
    from deepspeed.accelerator import get_accelerator

    from training.config import DeepSpeedArgs, OptimArgs
    from training.engine.strategy import Strategy

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)

    optim = OptimArgs(learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=4)
    with pytest.raises(SystemExit, match="fp16 at --zero_stage 0: DeepSpeed does not scale the loss"):
        Strategy(DeepSpeedArgs(zero_stage=0), optim, "fp16")
    moved = {}
    for stage, precision in ((1, "fp16"), (0, "fp32")):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        engine = Strategy(DeepSpeedArgs(zero_stage=stage), optim, precision).prepare(model, 10)
        before = model.weight.detach().float().clone()
        x = torch.randn(4, 64, dtype=torch.float16 if precision == "fp16" else torch.float32)
        engine.backward(1e-5 * engine(x).float().pow(2).mean())  # small gradients, as a 7B's LoRA ones
        engine.step()
        moved[precision] = float((model.weight.detach().float() - before).abs().mean()) / 1e-3
    assert moved["fp16"] == pytest.approx(moved["fp32"], rel=0.05) and moved["fp32"] > 0.5


def test_auto_device_follows_ds_accelerator_cpu(monkeypatch):
    """DS_ACCELERATOR=cpu on a GPU machine: parallel prediction gave its processes no GPU each ("share the CPU")
    while "auto" still chose cuda, so all of them loaded onto GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert inference_device("auto", "auto") == ("cpu", "fp32")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert inference_device("auto", "auto") == ("cuda", "bf16")
