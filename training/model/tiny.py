"""The embedded default VLM: a tiny LLaVA (hybrid vision tower + projector + Llama) for the embedded world.

The vision tower is transformers' DPT-hybrid encoder: a small BiT ResNet stem whose 8x8 feature map
becomes 64 tokens for two ViT layers. A plain from-scratch ViT (the "vit" tower, CLIP-style) learns
the world's shapes too slowly for minutes of CPU training - real LLaVA starts from a CLIP tower
pre-trained on 400M images; the convolutional stem gives the tiny model the prior it lacks.
`python -m benchmarks.vision_probe` measures both towers.

Built from transformers config classes with a word-level tokenizer made locally from the world's
vocabulary, then saved as an ordinary checkpoint, so every stage loads it through the same
builder code path as a real LLaVA checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from training.world.scenes import BACKGROUNDS, COLORS, IMAGE_SIZE, KINDS, NUMBERS, PLURAL

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
# words of the world's prompts and answers, and of the chat template
TEMPLATE_WORDS = """user assistant : the image shows on a background and , ( ) . ? describe in detail
is there are how many no yes not contains of this what objects
response should be fully supported by combination following captions correct option answer""".split()
# the last line is Fact-RLHF's factual block ("the response should be fully supported by the
# combination of the following captions:"), which the reward model reads

# LLaVA v1 conversation format, as the real llava-1.5 checkpoints use it.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    words = list(KINDS) + list(PLURAL.values()) + list(COLORS) + list(BACKGROUNDS) + list(NUMBERS)
    words += TEMPLATE_WORDS
    return SPECIALS + sorted(set(words) - set(SPECIALS))


def build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=True)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=8,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


VISION_TOWERS = ("hybrid", "vit")


def vision_config(hidden: int = 128, layers: int = 2, tower: str = "hybrid", image_size: int = IMAGE_SIZE):
    """The tiny VLM's vision tower config: 8x8-pixel cells -> (image_size / 8)^2 tokens plus a CLS token."""
    from transformers import CLIPVisionConfig, DPTConfig

    if tower == "vit":
        return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                                num_attention_heads=4, image_size=image_size, patch_size=8, projection_dim=hidden)
    if tower != "hybrid":
        raise ValueError(f"unknown tiny vision tower {tower!r}; choose from {VISION_TOWERS}")
    # BiT stem: /4, stage 2 halves again, stage 3 dilated instead of strided (output_stride 8)
    bit = dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_groups=8,
               layer_type="bottleneck", global_padding="same", output_stride=8,
               out_features=["stage1", "stage2", "stage3"])
    grid = image_size // 8
    return DPTConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                     image_size=image_size, patch_size=8, is_hybrid=True, backbone_config=bit,
                     backbone_featmap_shape=[1, bit["hidden_sizes"][-1], grid, grid])


def tiny_config(tokenizer, hidden: int = 128, layers: int = 2, tower: str = "hybrid", image_size: int = IMAGE_SIZE):
    from transformers import LlamaConfig, LlavaConfig

    vision = vision_config(hidden, layers, tower, image_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       image_seq_length=(image_size // 8) ** 2, pad_token_id=tokenizer.pad_token_id)


# Steps of the vision tower's tagging pre-training (training.model.tiny_vision) in a default build.
VISION_PRETRAIN_STEPS = 1500


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, hidden: int = 128, layers: int = 2,
                   vision_pretrain_steps: int | None = None) -> Path:
    """Write the tiny VLM checkpoint (safetensors) + processor to out_dir: random weights, except a
    vision tower pre-trained for `vision_pretrain_steps` (None: VISION_PRETRAIN_STEPS; 0: random)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    steps = _pretrain_steps(vision_pretrain_steps)
    out_dir = Path(out_dir)
    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(processor.tokenizer, hidden, layers))
    if steps:
        from training.model.tiny_vision import pretrain_vision_tower
        pretrain_vision_tower(model.model.vision_tower, hidden, steps, seed=seed)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_vlm.json").write_text(json.dumps(_signature(seed, hidden, layers, steps)))
    return out_dir


def _pretrain_steps(steps: int | None) -> int:
    return VISION_PRETRAIN_STEPS if steps is None else steps  # read at call time (tests set it to 0)


def _signature(seed: int, hidden: int, layers: int, vision_pretrain_steps: int) -> dict:
    return {"seed": seed, "hidden": hidden, "layers": layers, "vocab": vocabulary(), "template": CHAT_TEMPLATE,
            "vision": json.loads(vision_config(hidden, layers).to_json_string()),
            "vision_pretrain_steps": vision_pretrain_steps}


def ensure_tiny_vlm(out_dir: str | Path, seed: int = 0, hidden: int = 128, layers: int = 2,
                    vision_pretrain_steps: int | None = None) -> Path:
    """Build the tiny VLM once; rebuild when its definition (vocabulary, template, sizes) changed."""
    steps = _pretrain_steps(vision_pretrain_steps)
    out_dir = Path(out_dir)
    marker = out_dir / "tiny_vlm.json"
    if not marker.exists() or json.loads(marker.read_text()) != _signature(seed, hidden, layers, steps):
        build_tiny_vlm(out_dir, seed, hidden, layers, steps)
    return out_dir
