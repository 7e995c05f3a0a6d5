"""Registry of the VLM architectures the pipeline supports.

An `ArchSpec` says, for one family, which transformers classes load it, where its three parameter
groups live (vision encoder, multimodal projector, language model) and which linear layers of the
language model LoRA targets. Prefixes are the real parameter names of the transformers 5 classes
(`model.named_parameters()` of the *ForConditionalGeneration model). When prefixes nest (Qwen2-VL's
projector `model.visual.merger.` sits inside the vision tower `model.visual.`), the longest
matching prefix decides the group: see `param_group`.
"""
from __future__ import annotations

from dataclasses import dataclass

_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# + Phi-3's fused attention and MLP inputs: a LLaVA built from parts may hold a Phi-3-style LM, where the Llama names
# alone put adapters on o_proj and down_proj only (names a model lacks match nothing)
_LLAVA_LINEARS = _LLAMA_LINEARS + ("qkv_proj", "gate_up_proj")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this spec matches
    model_class: str  # transformers class name
    processor_class: str
    lora_targets: tuple[str, ...]  # language-model linear module names (last name component)
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    lm_prefixes: tuple[str, ...]
    multi_image: bool
    image_token: str  # placeholder the processor expects in text, once per image
    # model_type -> class name, where one family has several classes (SmolVLM inside idefics3)
    model_class_by_type: tuple[tuple[str, str], ...] = ()
    processor_class_by_type: tuple[tuple[str, str], ...] = ()

    def model_class_for(self, model_type: str) -> str:
        return dict(self.model_class_by_type).get(model_type, self.model_class)

    def processor_class_for(self, model_type: str) -> str:
        return dict(self.processor_class_by_type).get(model_type, self.processor_class)

    def param_group(self, param_name: str) -> str | None:
        """"vision" | "projector" | "lm" for a parameter name, or None when no prefix matches.

        Accepts names of a peft-wrapped model too (`base_model.model.` is stripped)."""
        name = param_name.removeprefix("base_model.model.")
        best, best_len = None, -1
        for group, prefixes in (("vision", self.vision_prefixes), ("projector", self.projector_prefixes),
                                ("lm", self.lm_prefixes)):
            for p in prefixes:
                if name.startswith(p) and len(p) > best_len:
                    best, best_len = group, len(p)
        return best


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            name="llava", model_types=("llava",),
            model_class="LlavaForConditionalGeneration", processor_class="LlavaProcessor",
            lora_targets=_LLAVA_LINEARS,
            vision_prefixes=("model.vision_tower.",),
            projector_prefixes=("model.multi_modal_projector.",),
            lm_prefixes=("model.language_model.", "lm_head."),
            multi_image=True, image_token="<image>",
        ),
        ArchSpec(
            name="llava_next", model_types=("llava_next",),
            model_class="LlavaNextForConditionalGeneration", processor_class="LlavaNextProcessor",
            lora_targets=_LLAVA_LINEARS,
            vision_prefixes=("model.vision_tower.",),
            # image_newline is the learned row separator that belongs with the projector
            projector_prefixes=("model.multi_modal_projector.", "model.image_newline"),
            lm_prefixes=("model.language_model.", "lm_head."),
            multi_image=True, image_token="<image>",
        ),
        ArchSpec(
            name="mllama", model_types=("mllama",),
            model_class="MllamaForConditionalGeneration", processor_class="MllamaProcessor",
            lora_targets=_LLAMA_LINEARS,
            vision_prefixes=("model.vision_model.",),
            projector_prefixes=("model.multi_modal_projector.",),
            lm_prefixes=("model.language_model.", "lm_head."),
            multi_image=True, image_token="<|image|>",
        ),
        ArchSpec(
            name="idefics3", model_types=("idefics3", "smolvlm"),
            model_class="Idefics3ForConditionalGeneration", processor_class="Idefics3Processor",
            lora_targets=_LLAMA_LINEARS,
            vision_prefixes=("model.vision_model.",),
            projector_prefixes=("model.connector.",),
            lm_prefixes=("model.text_model.", "lm_head."),
            multi_image=True, image_token="<image>",
            model_class_by_type=(("smolvlm", "SmolVLMForConditionalGeneration"),),
            processor_class_by_type=(("smolvlm", "SmolVLMProcessor"),),
        ),
        ArchSpec(
            name="qwen2_vl", model_types=("qwen2_vl",),
            model_class="Qwen2VLForConditionalGeneration", processor_class="Qwen2VLProcessor",
            lora_targets=_LLAMA_LINEARS,
            vision_prefixes=("model.visual.",),
            projector_prefixes=("model.visual.merger.",),
            lm_prefixes=("model.language_model.", "lm_head."),
            multi_image=True, image_token="<|image_pad|>",
        ),
        ArchSpec(
            name="qwen2_5_vl", model_types=("qwen2_5_vl",),
            model_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
            lora_targets=_LLAMA_LINEARS,
            vision_prefixes=("model.visual.",),
            projector_prefixes=("model.visual.merger.",),
            lm_prefixes=("model.language_model.", "lm_head."),
            multi_image=True, image_token="<|image_pad|>",
        ),
    )
}


def supported_names() -> list[str]:
    return sorted(ARCHITECTURES)


def detect_architecture(config, override: str = "auto") -> ArchSpec:
    """The spec for a transformers config (its model_type), or for `override` when it is not "auto".

    Raises ValueError naming the supported architectures; never returns None."""
    if override and override != "auto":
        if override in ARCHITECTURES:
            return ARCHITECTURES[override]
        for spec in ARCHITECTURES.values():
            if override in spec.model_types:
                return spec
        raise ValueError(f"Unknown model_architecture {override!r}; supported: {', '.join(supported_names())}")
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            return spec
    raise ValueError(f"Unsupported architecture (config.model_type={model_type!r}); supported: "
                     f"{', '.join(supported_names())} (model types: "
                     f"{', '.join(t for s in ARCHITECTURES.values() for t in s.model_types)})")
