"""Tiny random-weight checkpoints of every supported architecture, built locally (no download).

Each model comes from its real transformers config class (2 layers, hidden 32-64, images of 32 px
so an image costs at most a few dozen tokens) and is saved with a matching processor: a byte-level
BPE tokenizer trained in-process that holds every special token the real processor needs, the
architecture's real image processor class with small sizes, and a chat template reproducing the
real model's prompt format. Templates accept message content as a string or as a list of
{"type": "image"} / {"type": "text", "text": ...} parts, support `add_generation_prompt`, and close
every assistant turn with the end-of-turn token. As in the real checkpoints, the Llama-family
tokenizers (llava, llava_next, mllama, idefics3) add a BOS token when encoding with
add_special_tokens=True, and the mllama / idefics3 templates also start with the BOS text, so text
rendered by those templates should be encoded with add_special_tokens=False.

Usage: `make_tiny_checkpoint("llava", out_dir)` then
`load_model_and_processor(ModelArgs(from_checkpoint=out_dir), LoraArgs())`.
"""
from __future__ import annotations

from pathlib import Path

SUPPORTED_TINY = ["llava", "llava_next", "mllama", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"]

# Text sizes shared by every tiny language model.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
# Tiny CLIP / SigLIP-like vision sizes: 32 px images, 8 px patches -> 16 patches per image.
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8)

_WORDS = """
a an the this that these those is are was were be been it its he she they we you i me my your our
their what which who where when why how many much some any all no not yes and or but if then so of
in on at to from with without by for about above below under over between near left right top
bottom middle center front behind inside outside image picture photo scene shows show showing
there here one two three four five six seven eight nine ten zero first second third last color
red green blue yellow orange purple pink brown black white gray grey dark light bright small large
big tiny huge little round square circle triangle rectangle star shape shapes object objects thing
person man woman child dog cat bird car tree house table chair cup ball box book sky water grass
road sign text number answer question describe description detail details please briefly short
long sentence word count how many are visible can see cannot could would should does do did has
have had true false correct wrong option options choose choice letter user assistant system
helpful honest harmless chat between curious human artificial intelligence gives detailed polite
answers questions hello thanks sure okay looks like appears seems probably maybe because also very
more less most least same different other each every both either neither only just still again
""".split()


def _corpus() -> list[str]:
    # Sentences in a few forms so the BPE learns common merges incl. capitals and punctuation.
    lines = [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 12)]
    lines += [w.capitalize() + "." for w in _WORDS] + [w + "?" for w in _WORDS] + [w + "," for w in _WORDS]
    lines += ["USER: ASSISTANT: User: Assistant: [INST] [/INST] system user assistant\n\n 0123456789"]
    return lines * 3


def build_tokenizer(special_tokens: list[str], add_bos: str | None, **named_tokens):
    """A byte-level BPE (any text encodes, nothing is unknown) wrapped as a fast tokenizer.

    named_tokens: bos_token / eos_token / pad_token / unk_token -> token strings (all in special_tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos_id = tok.token_to_id(add_bos)
        template = processors.TemplateProcessing(single=f"{add_bos} $A", pair=f"{add_bos} $A {add_bos} $B:1",
                                                 special_tokens=[(add_bos, bos_id)])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    extra = [t for t in special_tokens if t not in named_tokens.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra,
                                   clean_up_tokenization_spaces=False, **named_tokens)


# ---- chat templates: each renders `content` (string, or list of image/text parts) in place ----

def _content_macro(image_text: str) -> str:
    """Jinja macro `render(content)`: a string as is, parts in order, an image part as image_text."""
    return ("{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
            "{%- for part in content -%}{%- if part['type'] == 'image' -%}"
            "{{ '" + image_text.replace("\n", "\\n") + "' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}"
            "{%- endif -%}{%- endmacro -%}")


# LLaVA-1.5 "v1": [system ]USER: <image>\nQ ASSISTANT: A</s>USER: ...
LLAVA_V1_TEMPLATE = _content_macro("<image>\n") + (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ render(m['content']) + ' ' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'USER: ' + render(m['content']) + ' ' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + render(m['content']) + eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")

# LLaVA-NeXT Mistral: [INST] <image>\nQ [/INST] A</s>[INST] ...   (a system text joins the first user turn)
_MISTRAL_TEMPLATE = _content_macro("<image>\n") + (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = render(m['content']) + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}{{ '[INST] ' + ns.system + render(m['content']) + ' [/INST]' }}"
    "{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + render(m['content']) + eos_token }}"
    "{%- endif -%}{%- endfor -%}")

# Llama-3.2-Vision: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Q<|eot_id|>...
_LLAMA3_TEMPLATE = _content_macro("<|image|>") + (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + render(m['content']) + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}")


def _idefics3_template(prefix: str) -> str:
    # Idefics3 / SmolVLM: User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n
    # (the real template writes ':' before an image part and ': ' before text)
    return _content_macro("<image>") + (
        "{{- '" + prefix + "' -}}"
        "{%- for m in messages -%}"
        "{%- set c = m['content'] -%}"
        "{{ m['role'] | capitalize }}"
        "{%- if c is not string and c | length > 0 and c[0]['type'] == 'image' -%}{{ ':' }}"
        "{%- else -%}{{ ': ' }}{%- endif -%}"
        "{{ render(c) + '<end_of_utterance>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}")


# Qwen2-VL / Qwen2.5-VL ChatML with the default system prompt.
_CHATML_TEMPLATE = _content_macro("<|vision_start|><|image_pad|><|vision_end|>") + (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + render(m['content']) + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")

_ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


# ---- one builder per architecture: returns (model, processor) ----

def _clip_vision(**over):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(**{**_VISION, "projection_dim": 32, **over})


def _clip_image_processor(cls_name="CLIPImageProcessor", **over):
    import transformers
    return getattr(transformers, cls_name)(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **over)


def _text_ids(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], add_bos="<s>",
                           unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlavaConfig(vision_config=_clip_vision(), text_config=LlamaConfig(**_TEXT, **_text_ids(tok)),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tok.pad_token_id)
    processor = LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_V1_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def _llava_next():
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              MistralConfig)
    tok = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], add_bos="<s>",
                           unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    pinpoints = [[32, 32], [32, 64], [64, 32]]  # at most 2 tiles: <= 52 image tokens per image
    config = LlavaNextConfig(vision_config=_clip_vision(), text_config=MistralConfig(**_TEXT, **_text_ids(tok)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints, pad_token_id=tok.pad_token_id)
    image_processor = _clip_image_processor("LlavaNextImageProcessor", image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_MISTRAL_TEMPLATE)
    return LlavaNextForConditionalGeneration(config), processor


def _mllama():
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor,
                              MllamaProcessor, MllamaTextConfig, MllamaVisionConfig)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]
    tok = build_tokenizer(specials, add_bos="<|begin_of_text|>", bos_token="<|begin_of_text|>",
                           eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=2, image_size=32, patch_size=8, max_num_tiles=2,
                                intermediate_layers_indices=[0], vision_output_dim=64,
                                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = MllamaTextConfig(**{k: v for k, v in _TEXT.items()}, cross_attention_layers=[1], **_text_ids(tok))
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    image_processor = MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=_LLAMA3_TEMPLATE)
    model = MllamaForConditionalGeneration(config)
    # The cross-attention gates start at 0 (tanh(0): images ignored, no gradient through the gated
    # branches); open them so the tiny model sees its images, as a trained one does.
    for name, p in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            p.data.fill_(0.5)
    return model, processor


def _idefics3_family(smol: bool):
    import transformers
    from transformers import LlamaConfig
    if smol:  # SmolVLM: SmolLM2 ChatML-style specials, no BOS added
        base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        named = dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
        add_bos, prefix = None, "<|im_start|>"
    else:  # Idefics3: Llama-3 tokenizer, adds <|begin_of_text|>
        base = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"]
        named = dict(bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>")
        add_bos, prefix = "<|begin_of_text|>", "<|begin_of_text|>"
    specials = base + ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + _ROW_COL
    if smol:
        specials.append("<video>")
    tok = build_tokenizer(specials, add_bos=add_bos, **named)
    kind = "SmolVLM" if smol else "Idefics3"
    vision = getattr(transformers, f"{kind}VisionConfig")(**_VISION)
    config = getattr(transformers, f"{kind}Config")(
        vision_config=vision, text_config=LlamaConfig(**_TEXT, **_text_ids(tok)), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    image_processor = getattr(transformers, f"{kind}ImageProcessor")(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    seq_len = (32 // 8) ** 2 // 2 ** 2  # patches / scale_factor**2 = 4 tokens per image
    kwargs = dict(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                  chat_template=_idefics3_template(prefix))
    if smol:
        kwargs["video_processor"] = transformers.SmolVLMVideoProcessor(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = getattr(transformers, f"{kind}Processor")(**kwargs)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    return model, processor


def _qwen_family(v2_5: bool):
    import transformers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(specials, add_bos=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 16 -> mrope over 8 frequencies
    kind = "Qwen2_5_VL" if v2_5 else "Qwen2VL"
    text = getattr(transformers, f"{kind}TextConfig")(
        **_TEXT, **_text_ids(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
    assert sum([2, 3, 3]) == head_dim // 2
    if v2_5:
        vision = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                     patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
                                                     window_size=32, out_hidden_size=_TEXT["hidden_size"],
                                                     fullatt_block_indexes=[1])
    else:
        vision = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"],
                                                  num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
                                                  temporal_patch_size=2)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    config = getattr(transformers, f"{kind}Config")(text_config=text, vision_config=vision, **ids)
    # 8 px patches merged 2x2: images resized to multiples of 16 px, at most 64x64 px -> <= 16 tokens
    pix = dict(patch_size=8, merge_size=2, temporal_patch_size=2,
               size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    image_processor = transformers.Qwen2VLImageProcessor(**pix)
    video_processor = transformers.Qwen2VLVideoProcessor(**pix)
    processor = getattr(transformers, f"{kind}Processor")(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        chat_template=_CHATML_TEMPLATE)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    return model, processor


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "mllama": _mllama,
    "idefics3": lambda: _idefics3_family(smol=False),
    "smolvlm": lambda: _idefics3_family(smol=True),
    "qwen2_vl": lambda: _qwen_family(v2_5=False),
    "qwen2_5_vl": lambda: _qwen_family(v2_5=True),
}


def make_tiny_checkpoint(arch_name: str, out_dir: str | Path, seed: int = 0) -> str:
    """Build a tiny random model of `arch_name` (one of SUPPORTED_TINY) with its processor, save both
    to out_dir (safetensors) and return out_dir as a string."""
    import torch

    if arch_name not in _BUILDERS:
        raise ValueError(f"No tiny model for {arch_name!r}; supported: {', '.join(SUPPORTED_TINY)}")
    torch.manual_seed(seed)
    model, processor = _BUILDERS[arch_name]()
    processor.tokenizer.chat_template = processor.chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return str(out_dir)
