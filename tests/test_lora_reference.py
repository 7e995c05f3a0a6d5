"""The reference of a LoRA policy without a second model: adapters off AND the other trained weights (projector,
vision tower) back at their start. Adapters off alone let the reference move with every update of those."""
import pytest
import torch

from training.config import DeepSpeedArgs, LoraArgs, ModelArgs, OptimArgs
from training.engine.strategy import Strategy
from training.model.builder import load_model_and_processor
from training.model.reference import lora_reference, snapshot


def _batch(proc, arch):
    """One image and a text: the vision tower and projector count in the logits."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return dict(proc(text=[f"{arch.image_token} a red circle and two blue squares"], images=[image],
                     return_tensors="pt"))


def test_lora_reference_is_the_starting_model_after_updates(tiny):
    model, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)),
                                                 LoraArgs(lora_r=4, lora_target_modules="q_proj,v_proj"))
    engine = Strategy(DeepSpeedArgs(), OptimArgs(), "fp32").prepare(model, 10)
    start = snapshot(engine)
    assert start and all("lora_" not in n for n in start)  # the projector and vision tower train here
    with torch.no_grad():  # "updates": every trainable weight moves, adapters included
        for p in engine.module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    frozen, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    b = _batch(proc, arch)
    with torch.no_grad():
        want = frozen(**b).logits
        with lora_reference(engine, start):
            got = engine.module(**b).logits
        after = engine.module(**b).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (after - want).abs().max() > 1e-3  # outside the block: the moved policy
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, moved[n]), n  # its own weights are back
    # adapters off alone is not the starting model once a trained non-adapter weight moved
    with torch.no_grad(), engine.module.disable_adapter():
        assert (engine.module(**b).logits - want).abs().max() > 1e-3


def test_lora_reference_refuses_a_stale_snapshot(tiny):
    model, _, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(lora_r=4))
    engine = Strategy(DeepSpeedArgs(), OptimArgs(), "fp32").prepare(model, 10)
    with pytest.raises(ValueError, match="changed since the reference snapshot"):
        with lora_reference(engine, {}):
            pass
