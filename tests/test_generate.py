"""Generation never emits an image placeholder or padding (a sampled <image> breaks the next forward)."""
import torch

from training.config import LoraArgs, ModelArgs
from training.data.bad_rows import BadRowReport
from training.data.formats import read_prompts
from training.data.images import load_image
from training.model.builder import load_model_and_processor
from training.ppo.rollout import generate_rollouts
from training.predict.generate import DecodeArgs, generate_batch, stop_and_never
from training.templates.chat import ChatEncoder


def _setup(world, tiny):
    model, processor, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(),
                                                      for_training=False)
    records = read_prompts([str(world / "ppo_prompts.json")], str(world / "images"), BadRowReport())[:3]
    images = [[load_image(src, str(world / "images")) for src in r.images] for r in records]
    return model, processor, arch, [r.prompt for r in records], images


def test_image_token_is_suppressed_even_when_it_is_the_likeliest(world, tiny):
    model, processor, arch, prompts, images = _setup(world, tiny)
    image_id = model.config.image_token_id
    eos = processor.tokenizer.eos_token_id
    assert stop_and_never(model, processor.tokenizer) == ([eos], sorted({image_id, processor.tokenizer.pad_token_id}))
    # make <image> the most likely next token everywhere
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([image_id]), torch.full((*out.shape[:-1], 1), 1e4)))
    encoder = ChatEncoder(processor, arch, 160)
    decode = DecodeArgs(max_new_tokens=6)
    ro = generate_rollouts(model, processor, encoder, arch.name, prompts, images, decode, "cpu")
    resp = ro.batch.input_ids[ro.batch.labels != -100]
    assert resp.numel() > 0 and image_id not in resp.tolist()
    # the same generation without suppression does emit it (so the check above can fail)
    enc = encoder.encode(prompts[0], images[0], add_generation_prompt=True)
    raw = model.generate(input_ids=enc.input_ids[None], attention_mask=torch.ones_like(enc.input_ids)[None],
                         **enc.vision, max_new_tokens=1, do_sample=False)
    assert raw[0, -1].item() == image_id
    # generate_batch decodes without special tokens: had it sampled only <image>, its texts would be empty
    texts = generate_batch(model, processor, encoder, arch.name, prompts, images, decode)
    assert all(t[0].strip() for t in texts)
