"""Merge LoRA adapters written by `training.model.builder.save_model` into a plain checkpoint.

    python -m training.model.merge_lora --adapter_dir OUT_OF_A_LORA_RUN --output_dir MERGED

The base is reloaded, the adapters and the non-LoRA trainables (vision tower / projector trained in
full) are applied, LoRA is merged into the base weights, and the result is saved with safetensors
beside the processor: an ordinary checkpoint for `load_model_and_processor`. After QLoRA the base is
quantized to 4-bit NF4 exactly as in training and dequantized before the merge, so the merged model
computes what was trained (adapters learnt against the 4-bit weights; merged into the full-precision
ones, the tiny VLM's hidden states moved by 0.68); `--original_base` merges into the full-precision
weights instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _adapter_dir(path: str | Path) -> Path:
    from training.model.builder import ADAPTER_SUBDIR
    p = Path(path)
    return p / ADAPTER_SUBDIR if (p / ADAPTER_SUBDIR / "adapter_config.json").is_file() else p


def load_merged(adapter_dir_or_checkpoint: str | Path, precision: str | None = None,
                trust_remote_code: bool = False, original_base: bool = False):
    """-> (merged plain model, processor, base path). precision: fp32 | bf16 | fp16, default the
    training run's (fp32 when unknown). Model code from the base runs only when the caller asks
    (trust_remote_code), never because the adapter's files say so. After QLoRA the adapters go onto the
    base's 4-bit values (dequantized), or with original_base onto its full-precision weights."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor

    from training.model.architectures import detect_architecture
    from training.model.builder import BUILD_INFO_FILE, NON_LORA_FILE, recorded_base, torch_dtype

    adapter = _adapter_dir(adapter_dir_or_checkpoint)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No LoRA adapter (adapter_config.json) in {adapter_dir_or_checkpoint}")
    info_file = adapter / BUILD_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    base = recorded_base(info.get("base") or
                         json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    trust = trust_remote_code
    if info.get("trust_remote_code") and not trust:
        raise SystemExit(f"{info_file}: this adapter was trained with --trust_remote_code (its base {base} runs "
                         "code of its own); pass --trust_remote_code to load it if you trust that code")
    from training.model.builder import is_adapter_checkpoint, merged_checkpoint
    own = Path(base).resolve() == adapter.parent.resolve()  # adapters saved beside their own base's full weights
    if Path(base).is_dir() and is_adapter_checkpoint(base) and not own:  # LoRA on a LoRA checkpoint: merge that first
        base = merged_checkpoint(base, trust)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust)
    spec = detect_architecture(config, info.get("model_architecture", "auto"))
    model_cls = getattr(transformers, spec.model_class_for(config.model_type))
    dtype = torch_dtype(precision or info.get("precision") or "fp32")
    quantized = info.get("qlora") and not original_base
    if quantized:  # the 4-bit weights the adapters were trained against, quantized from what training loaded
        from training.config import LoraArgs, ModelArgs
        from training.model.builder import _bnb_config
        trained = info.get("precision") or "fp32"
        q = _bnb_config(spec, ModelArgs(precision=trained),
                        LoraArgs(qlora=True, bnb_double_quant=info["qlora"]["double_quant"]))
        # device_map cpu: bitsandbytes would place it on the current GPU, where a 7B dequantized to fp16 (14 GB)
        # does not fit a 16 GB T4 (the 2x T4 reward-model profile starts from output/sft, QLoRA adapters)
        model = model_cls.from_pretrained(base, config=config, dtype=torch_dtype(trained), trust_remote_code=trust,
                                          quantization_config=q, use_safetensors=True,
                                          device_map="cpu").dequantize().to(dtype)
    else:
        model = model_cls.from_pretrained(base, config=config, dtype=dtype, trust_remote_code=trust,
                                          use_safetensors=True)

    if (adapter / NON_LORA_FILE).is_file():
        extra = load_file(str(adapter / NON_LORA_FILE))
        missing = set(extra) - set(dict(model.named_parameters()))
        if missing:
            raise ValueError(f"{adapter / NON_LORA_FILE}: parameters not in the base model: {sorted(missing)[:5]}")
        model.load_state_dict(extra, strict=False)
    if not (adapter / "adapter_model.safetensors").is_file():  # peft would fall back to a pickled .bin
        raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors (adapters load from safetensors only)")
    model = PeftModel.from_pretrained(model, str(adapter))
    untie_adapted_output_layer(model.get_base_model())
    model = model.merge_and_unload()
    processor_dir = adapter.parent if (adapter.parent / "processor_config.json").is_file() or \
        (adapter.parent / "tokenizer_config.json").is_file() else base
    processor = AutoProcessor.from_pretrained(processor_dir, trust_remote_code=trust)
    return model, processor, base


def untie_adapted_output_layer(model) -> None:
    """An output layer with adapters (--lora_target_modules ...,lm_head) whose weight is the input embeddings' (tied,
    as in Qwen2-VL 2B) gets a copy of its own, and the config says so: merged into the shared weight, the adapters
    changed the input embeddings too, and the merged model was another than the trained one."""
    import torch
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    layer = getattr(out, "base_layer", None)
    if layer is None or emb is None or layer.weight is not emb.weight:
        return
    layer.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def merge_lora(adapter_dir_or_checkpoint: str | Path, out_dir: str | Path, precision: str | None = None,
               trust_remote_code: bool = False, original_base: bool = False) -> str:
    """Merge a LoRA run's adapters into its base and save a plain checkpoint to out_dir."""
    from training.model.builder import save_model
    run_dir = _adapter_dir(adapter_dir_or_checkpoint).parent
    if Path(out_dir).resolve() in (run_dir.resolve(), _adapter_dir(adapter_dir_or_checkpoint).resolve()):
        raise SystemExit(f"merge_lora: --output_dir {out_dir} is the adapters' own folder, which the merged model "
                         "would replace: give another folder")
    from training.rm.model import INFO_FILE, head_files, is_reward_model
    rm_files = [INFO_FILE, *head_files(run_dir, json.loads((run_dir / INFO_FILE).read_text()))] \
        if is_reward_model(run_dir) else []  # a reward model's record and heads go with its merged backbone
    model, processor, _ = load_merged(adapter_dir_or_checkpoint, precision, trust_remote_code, original_base)
    saved = save_model(model, processor, out_dir)
    import shutil
    for name in rm_files:
        shutil.copyfile(run_dir / name, Path(out_dir) / name)
    return saved


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--adapter_dir", required=True, help="A LoRA run's output dir (or its adapter/ subdir).")
    ap.add_argument("--output_dir", required=True, help="Where the merged checkpoint goes.")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="Merge and save in this precision (default: the training run's).")
    ap.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the base checkpoint.")
    ap.add_argument("--original_base", action="store_true",
                    help="After QLoRA: merge into the base's full-precision weights, not the 4-bit values the "
                         "adapters were trained against (the default, which computes what was trained).")
    args = ap.parse_args(argv)
    print(merge_lora(args.adapter_dir, args.output_dir, args.precision, args.trust_remote_code, args.original_base))


if __name__ == "__main__":
    main()
