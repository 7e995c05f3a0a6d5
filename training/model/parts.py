"""A VLM composed from parts: a CLIP / SigLIP / open_clip vision tower and a causal language model joined by an MLP
projector into an ordinary LLaVA checkpoint (Vision-LLM-Alignment's `default` architecture). The builder makes one
per version of the parts in the user's model cache (`training.model.builder.composed_checkpoint`).
"""
from __future__ import annotations

from pathlib import Path

_VISION_CLASSES = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
                   "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def build_from_parts(vision_tower_path: str, language_model_path: str, out_dir: str | Path,
                     image_size: int | None = None, seed: int = 0) -> str:
    """Compose a vision encoder and a causal LM into a LLaVA checkpoint (Vision-LLM-Alignment's
    `default` architecture) and save it to out_dir, which then loads as an ordinary llava model.

    vision_tower_path: a CLIP or SigLIP checkpoint (full or vision-only) with its image processor, or
    "open_clip:ARCH" (random weights) / "open_clip:ARCH:FILE" (weights from a local file), converted
    to a transformers CLIP vision model (plain ViTs only, see `open_clip_to_clip_vision`).
    The projector is a 2-layer GELU MLP, randomly initialised from `seed`; both parts keep their
    pretrained weights; the tokenizer gains "<image>" (and "<pad>" when it has no pad token)."""
    import torch
    import transformers
    from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    from training.model.tiny_archs import LLAVA_V1_TEMPLATE

    if vision_tower_path.startswith("open_clip:"):
        vision, image_processor = load_open_clip_vision(vision_tower_path)
        model_type = "clip"
    else:
        vcfg = AutoConfig.from_pretrained(vision_tower_path)
        if vcfg.model_type not in _VISION_CLASSES:
            raise ValueError(f"{vision_tower_path}: vision tower must be CLIP or SigLIP, got {vcfg.model_type!r}")
        vision = getattr(transformers, _VISION_CLASSES[vcfg.model_type]).from_pretrained(
            vision_tower_path, dtype=torch.float32, use_safetensors=True)
        image_processor = AutoImageProcessor.from_pretrained(vision_tower_path)
        model_type = vcfg.model_type
    if image_size and image_size != vision.config.image_size:
        _resize_position_embeddings(vision, image_size)
        _set_image_size(image_processor, image_size)
    vision_config = vision.config

    tokenizer = AutoTokenizer.from_pretrained(language_model_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    lm = AutoModelForCausalLM.from_pretrained(language_model_path, dtype="auto", use_safetensors=True)
    save_dtype = lm.dtype
    lm = lm.float()
    lm.resize_token_embeddings(len(tokenizer))

    has_cls = model_type.startswith("clip")  # SigLIP has no CLS token
    config = LlavaConfig(vision_config=vision_config.to_dict() | {"model_type": vision_config.model_type},
                         text_config=lm.config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if has_cls else "full",
                         pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.to(save_dtype)

    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if has_cls else 0, chat_template=LLAVA_V1_TEMPLATE)
    tokenizer.chat_template = LLAVA_V1_TEMPLATE
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def _resize_position_embeddings(vision, image_size: int) -> None:
    """Bicubic-interpolate a CLIP/SigLIP vision model's patch position embeddings to a new image size."""
    import torch
    import torch.nn.functional as F

    emb = getattr(vision, "vision_model", vision).embeddings  # transformers 5 flattened vision_model
    old = emb.position_embedding.weight.data  # (n_cls + g*g, D)
    n_cls = 1 if hasattr(emb, "class_embedding") else 0
    g_old = int(round((old.shape[0] - n_cls) ** 0.5))
    g_new = image_size // vision.config.patch_size
    grid = old[n_cls:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    new = torch.cat([old[:n_cls], grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1)])
    emb.position_embedding = torch.nn.Embedding(new.shape[0], new.shape[1], _weight=new.contiguous())
    emb.num_patches, emb.num_positions = g_new * g_new, new.shape[0]
    emb.image_size = image_size
    emb.register_buffer("position_ids", torch.arange(new.shape[0]).expand((1, -1)), persistent=False)
    vision.config.image_size = image_size


def _set_image_size(image_processor, image_size: int) -> None:
    size = getattr(image_processor, "size", None) or {}
    if "shortest_edge" in size:
        image_processor.size = {"shortest_edge": image_size}
    else:
        image_processor.size = {"height": image_size, "width": image_size}
    if getattr(image_processor, "crop_size", None):
        image_processor.crop_size = {"height": image_size, "width": image_size}


def load_open_clip_vision(spec: str):
    """"open_clip:ARCH[:LOCAL_WEIGHTS_FILE]" -> (CLIPVisionModel, CLIPImageProcessor). Never downloads:
    without a file the weights are random."""
    import open_clip
    from transformers import CLIPImageProcessor

    _, arch, *rest = spec.split(":", 2)
    weights = rest[0] if rest else None
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"{spec}: open_clip weights must be a local file (no download)")
    if weights and not weights.endswith(".safetensors"):  # open_clip reads any other file with torch.load (pickle)
        raise ValueError(f"{spec}: open_clip weights must be a .safetensors file")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{spec}: unknown open_clip architecture {arch!r}")
    model = open_clip.create_model(arch, pretrained=weights, device="cpu")
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", cfg["vision_cfg"].get("image_size", 224))
    size = size if isinstance(size, int) else size[0]
    vision = open_clip_to_clip_vision(model.visual, quick_gelu=bool(cfg.get("quick_gelu", False)))
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                                   image_std=list(pre.get("std", open_clip.OPENAI_DATASET_STD)))
    return vision, processor


def open_clip_to_clip_vision(visual, quick_gelu: bool = False):
    """Copy an open_clip VisionTransformer into a transformers CLIPVisionModel with the same outputs
    (pooler_output @ visual.proj == visual(x)). Only the plain CLIP ViT layout is supported."""
    import torch
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModel

    unsupported = [why for why, bad in (
        ("not a VisionTransformer (timm / ModifiedResNet tower)", not isinstance(visual, VisionTransformer)),
        ("attentional pooling", getattr(visual, "attn_pool", None) is not None),
        ("no ln_pre", isinstance(getattr(visual, "ln_pre", None), torch.nn.Identity)),
        ("pool type other than 'tok'", getattr(visual, "pool_type", "tok") != "tok"),
        ("final_ln_after_pool", getattr(visual, "final_ln_after_pool", False)),
    ) if bad]
    if not unsupported:
        block = visual.transformer.resblocks[0]
        if not isinstance(block.attn, torch.nn.MultiheadAttention):
            unsupported.append("custom attention block")
        if not isinstance(block.ls_1, torch.nn.Identity):
            unsupported.append("layer scale")
    if unsupported:
        raise NotImplementedError(f"open_clip tower not convertible to CLIP: {', '.join(unsupported)}")

    blocks = visual.transformer.resblocks
    width = visual.class_embedding.shape[0]
    patch = visual.conv1.kernel_size[0]
    grid = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
                              num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
                              image_size=grid * patch, patch_size=patch, layer_norm_eps=visual.ln_pre.eps,
                              hidden_act="quick_gelu" if quick_gelu else "gelu",
                              projection_dim=visual.proj.shape[1] if visual.proj is not None else width)
    sd = {"vision_model.embeddings.class_embedding": visual.class_embedding,
          "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
          "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
          "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
          "vision_model.post_layernorm.weight": visual.ln_post.weight,
          "vision_model.post_layernorm.bias": visual.ln_post.bias}
    for i, b in enumerate(blocks):
        h = f"vision_model.encoder.layers.{i}."
        qkv_w, qkv_b = b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[h + f"self_attn.{name}.weight"], sd[h + f"self_attn.{name}.bias"] = qkv_w[j], qkv_b[j]
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, mod in pairs.items():
            sd[h + name + ".weight"], sd[h + name + ".bias"] = mod.weight, mod.bias
    model = CLIPVisionModel(config)
    # transformers 5 dropped the `vision_model.` level; keep working with either layout
    nested = next(iter(model.state_dict())).startswith("vision_model.")
    sd = {(k if nested else k.removeprefix("vision_model.")): v.detach().float().clone() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model
