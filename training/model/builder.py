"""The one model builder every stage uses: checkpoint -> (model, processor, ArchSpec).

`load_model_and_processor` resolves what to load (a checkpoint, a LoRA adapter checkpoint written by
`save_model`, parts to compose, or nothing: the embedded tiny VLM), loads it in the requested
precision (optionally 4-bit NF4 for QLoRA), then applies, in this order: freezing of the three
parameter groups, LoRA on the language model, gradient checkpointing.

With LoRA the language model's base weights are frozen and only its adapters train; the vision tower
and the projector keep their own freeze flags, and when trainable they train in full ("stay
trainable") and `save_model` writes them beside the adapters (non_lora_trainables.safetensors, the
LLaVA convention) so `merge_lora` restores them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from training.config import LoraArgs, ModelArgs
from training.files import locked, umask_mode
from training.model.architectures import ArchSpec, detect_architecture
from training.model.cache import cache_dir
from training.model.mllama_rows import mask_imageless_samples

ADAPTER_SUBDIR = "adapter"
NON_LORA_FILE = "non_lora_trainables.safetensors"
BUILD_INFO_FILE = "vlm_builder.json"  # how the base model was loaded (for merge_lora)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
           "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_dtype(precision: str):
    import torch
    if precision not in _DTYPES:
        raise ValueError(f"Unknown precision {precision!r}; use fp32, bf16 or fp16")
    return getattr(torch, _DTYPES[precision])


def inference_device(device: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """Where generation outside DeepSpeed runs (prediction, OPA rollouts): "auto" -> the GPU in bf16 when
    there is one (fp16 on GPUs without bf16), else the CPU in fp32; DS_ACCELERATOR=cpu means the CPU, as it does
    for training and for parallel prediction's processes (which then share the CPU, not GPU 0). On the CPU, freed
    tensor memory is kept for reuse from here on (training.engine.cpu_memory)."""
    import os

    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu" else "cpu"
    if device == "cpu":
        from training.engine.cpu_memory import keep_freed_memory
        keep_freed_memory()
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if native_bf16() else "fp16")
    return device, precision


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0 on: Ampere and later). A T4 or V100
    reports bf16 as supported (emulated: slow, and no bf16 convolutions for a vision tower's patch embedding)."""
    import torch
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def disable_dropout(model):
    """Dropout off for good, also in train mode: dropout modules (LoRA's too) and the attention-dropout
    rates attention layers keep as numbers. Log-prob ratios (DPO's, PPO's) are then deterministic."""
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


def eval_mode(model):
    """model.eval() (dropout off); works on DeepSpeed engines too (whose eval() returns None); returns the model.
    4-bit layers compute the same function in either mode (`keep_4bit_weights_unpacked`)."""
    model.eval()
    return model


def add_inference_args(parser, what: str = "") -> None:
    """--device / --precision of generation outside DeepSpeed (see inference_device)."""
    parser.add_argument("--device", default="auto", help=f"{what}auto (the GPU when there is one, else the CPU) "
                        "| cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help=f"{what}auto (bf16 on a GPU that supports it, fp16 on one that does not, else fp32)")


def is_adapter_checkpoint(path: str | Path) -> bool:
    """A directory written by `save_model` for a peft model (adapter/ inside, or the adapter dir itself)."""
    p = Path(path)
    return (p / ADAPTER_SUBDIR / "adapter_config.json").is_file() or (
        (p / "adapter_config.json").is_file() and not (p / "config.json").is_file())


def resolve_checkpoint(model_args: ModelArgs) -> str:
    """The plain checkpoint to load: from parts, a merged adapter checkpoint, the given path or Hub id,
    or (nothing given) the embedded tiny VLM. Built things are made once in the user's model cache
    (training.model.cache), by rank 0 when several ranks run; their random parts are seeded."""
    if model_args.vision_tower and model_args.language_model:
        return made_once(lambda: composed_checkpoint(model_args.vision_tower, model_args.language_model))
    if model_args.vision_tower or model_args.language_model:
        raise ValueError("Building from parts needs both --vision_tower and --language_model")
    if not model_args.from_checkpoint:
        return embedded_tiny_vlm()
    if Path(model_args.from_checkpoint).is_dir() and is_adapter_checkpoint(model_args.from_checkpoint):
        return made_once(lambda: merged_checkpoint(model_args.from_checkpoint, model_args.trust_remote_code))
    name = model_args.from_checkpoint
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        # no Hub id (name or namespace/name): transformers said "Repo id must be in the form ...", not that it is gone
        raise SystemExit(f"{name}: no such checkpoint folder (nor a Hub id, which is NAME or NAMESPACE/NAME)")
    if Path(name).is_dir():
        refuse_folder_without_model(Path(name))
    return absolute_if_local(name)


def refuse_folder_without_model(folder: Path) -> None:
    """A local checkpoint folder with no model to load stopped on an OSError traceback from deep in transformers'
    from_pretrained: one without config.json (an interrupted run's output) or without safetensors weights."""
    if not (folder / "config.json").is_file():
        hint = (" (an interrupted run's output: continue it with --resume)" if (folder / "checkpoints").is_dir()
                else "")
        raise SystemExit(f"{folder}: no config.json, so no model to load here{hint}; give a folder a stage finished "
                         "(its config.json and model.safetensors) or a Hub id")
    # (pickled .bin weights alone are left to transformers, which refuses them: safetensors only)
    if not saved_model_files(folder, adapter=False) and not any(folder.glob("*.bin")):
        raise SystemExit(f"{folder}: no weights (*.safetensors) beside its config.json; give a folder that holds "
                         "the model's weights")


def absolute_if_local(path: str) -> str:
    """A local checkpoint's absolute path (what transformers records as the model's name_or_path, and a LoRA run as
    its adapters' base: a relative one named nothing from another working folder); a Hub id as it is."""
    return os.path.abspath(path) if Path(path).exists() else path


REPOSITORY = Path(__file__).resolve().parents[2]  # where the run_*.sh scripts run


def recorded_base(base: str) -> str:
    """An adapter's recorded base as a path that loads: adapters saved before bases were recorded absolute hold the
    path relative to the folder their run_*.sh ran in, the repository's; from another working folder it is looked
    for there. Absolute paths and Hub ids are as recorded."""
    if Path(base).is_absolute() or Path(base).exists():
        return base
    in_repo = REPOSITORY / base
    return str(in_repo) if in_repo.exists() else base


def made_once(make) -> str:
    """make() -> a folder, on rank 0 only when several ranks run (torch.distributed), every rank getting its path:
    transformers' save_pretrained writes a model's weights on global rank 0 only, so another rank's own copy held
    none (a LoRA merge in the shared cache could then be a folder without a model, for good). The ranks share a
    file system, as a multi-node run must. The others wait in a group of their own with a long timeout (merging a
    large model can outlast the run's group's, DeepSpeed's 10 minutes), and raise when rank 0 failed."""
    from datetime import timedelta

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return make()
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(make(), None)]
        except Exception as err:
            dist.broadcast_object_list([(None, f"{type(err).__name__}: {err}")], src=0, group=group)
            raise
    dist.broadcast_object_list(box, src=0, group=group)
    path, error = box[0]
    if error:
        raise RuntimeError(f"rank 0 could not make the checkpoint every rank loads: {error}")
    return path


def _digest(*parts) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _stats(files, root: Path) -> list:
    return [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files)]


def _built_once(final: Path, build) -> str:
    """final, made by build(staging folder) unless it holds a model's weights already. One process makes it at a
    time (a lock file beside it): independent processes on one checkpoint (run_predict.sh's chunk processes on a
    LoRA checkpoint) merged it each, N times the memory at once; the others wait and load it. It appears by an
    atomic rename, so a process that does not take the lock never reads half of one. A folder there without weights
    (left by ranks that each made their own copy, before made_once) is made again."""
    import shutil
    if saved_model_files(final, adapter=False):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.with_name(f".{final.name}.lock")):
        if not saved_model_files(final, adapter=False):  # not made while this process waited
            shutil.rmtree(final, ignore_errors=True)
            staging = build(tempfile.mkdtemp(dir=final.parent))
            try:
                os.rename(staging, final)
            except OSError:  # a process without the lock won the race: its copy is the same
                shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def merged_checkpoint(adapter_checkpoint: str, trust_remote_code: bool = False) -> str:
    """A LoRA checkpoint merged into its base, as a plain checkpoint: made once per version of what loading it reads
    (in <user cache>/merged/<digest of its fingerprint: training.model.fingerprint, its base's files included>:
    training.model.cache) and reused by every later load, rank and reference copy. Keyed by every JSON file beside
    the adapters, it was merged anew (another full copy) after each score written there (eval_*.json) or pipeline
    record, and a retrained base was not merged again."""
    from training.model.fingerprint import model_fingerprint
    from training.model.merge_lora import merge_lora
    root = Path(adapter_checkpoint).resolve()
    final = cache_dir("merged") / _digest(str(root), model_fingerprint(root), trust_remote_code)
    return _built_once(final, lambda staging: merge_lora(root, staging, trust_remote_code=trust_remote_code))


def composed_checkpoint(vision_tower: str, language_model: str) -> str:
    """`training.model.parts.build_from_parts` of a vision tower and a language model (local folders or files, Hub ids, open_clip specs),
    made once per version of their files in <user cache>/from_parts/<digest> (it was made anew in a temporary folder
    by every run, on a multi-node run in each machine's own /tmp). A Hub id's version is its local cache's current
    snapshot (training.model.fingerprint): by its name alone, a new revision reused the old one's composition."""
    def version(spec: str):
        local = Path(spec.split(":", 2)[2] if spec.startswith("open_clip:") and spec.count(":") == 2 else spec)
        if local.is_dir():
            return _stats((f for f in local.rglob("*") if f.is_file()), local)
        if local.is_file():
            return _stats([local], local.parent)
        from training.model.fingerprint import model_fingerprint
        return model_fingerprint(spec)
    final = cache_dir("from_parts") / _digest(vision_tower, version(vision_tower), language_model,
                                              version(language_model))
    from training.model import parts
    return _built_once(final, lambda staging: parts.build_from_parts(vision_tower, language_model, staging))


def embedded_tiny_vlm() -> str:
    """The embedded tiny LLaVA (`training.model.tiny`, seeded) in <user cache>/tiny_vlm, built once (`_built_once`)."""
    from training.model.tiny import build_tiny_vlm, ensure_tiny_vlm
    final = _built_once(cache_dir() / "tiny_vlm", build_tiny_vlm)
    return str(ensure_tiny_vlm(final))  # rebuilt in place only if its definition changed


WHOLE_ONLY = {"bit": "transformers' BiT backbone (the embedded tiny VLM's DPT-hybrid tower) makes a tensor from a "
                     "numpy array as it is built, which deepspeed.zero.Init's tensor constructor cannot take"}


def _model_types(config) -> set[str]:
    """The model types of a config and of every config inside it (vision tower, its backbone, text model...)."""
    from transformers import PretrainedConfig
    inner = [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    return {config.model_type} | {t for c in inner for t in _model_types(c)}


@contextlib.contextmanager
def _partitioned(zero3: dict | None, config, path: str):
    """Models transformers loads inside are built under deepspeed.zero.Init with this ZeRO-3 config (it reads the
    config through a weak reference that must stay alive); None: built whole. 4-bit models are always built whole
    (transformers never partitions a quantized model), and so are models with a part in WHOLE_ONLY (DeepSpeed then
    partitions them as the engine starts)."""
    blocked = sorted(_model_types(config) & set(WHOLE_ONLY)) if zero3 is not None else []
    if blocked and int(os.environ.get("RANK", "0")) == 0:
        print(f"ZeRO-3: {path} is built whole on every rank, then partitioned: {WHOLE_ONLY[blocked[0]]}")
    if zero3 is None or blocked:
        yield
        return
    import torch
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    alive = HfDeepSpeedConfig(zero3)
    # built for real, a model draws random numbers (CLIP's class embedding; a whole build makes them on the meta
    # device): the random state is left as a whole build leaves it, so what the caller draws next (a reward head's
    # initial weights) does not depend on the ZeRO stage
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        unset_hf_deepspeed_config()  # later loads (merges, generation outside DeepSpeed) see no ZeRO-3
        del alive


def load_model_and_processor(model_args: ModelArgs, lora_args: LoraArgs, *, for_training: bool = True,
                             zero3: dict | None = None):
    """-> (model, processor, arch_spec). for_training=False: frozen, eval mode, no LoRA or checkpointing
    (reference / reward-scoring copies); QLoRA still loads the base in 4-bit then. zero3: the ZeRO-3 config of the
    engine the model goes into (`Strategy.build_config`): the model is then built partitioned across the ranks."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    path = resolve_checkpoint(model_args)
    trust = model_args.trust_remote_code
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    spec = detect_architecture(config, model_args.model_architecture)
    if lora_args.qlora and lora_args.lora_r <= 0 and for_training:
        raise ValueError("--qlora trains LoRA adapters on a 4-bit base: set --lora_r > 0")
    if lora_args.lora_r > 0 and model_args.freeze_language_model and for_training:
        raise ValueError("LoRA adapts the language model, which --freeze_language_model freezes: pick one")

    kwargs = {"dtype": torch_dtype(model_args.precision), "trust_remote_code": trust, "use_safetensors": True}
    if lora_args.qlora:
        kwargs["quantization_config"] = _bnb_config(spec, model_args, lora_args)
    model_cls = getattr(transformers, spec.model_class_for(config.model_type))
    with _partitioned(zero3, config, path):
        model = model_cls.from_pretrained(path, config=config, **kwargs)
    # transformers (5.23) keeps, after a ZeRO-3 load, every weight renaming it tried, and save_pretrained reverses
    # them all: a LLaVA was saved as language_model.model.model.*, which no later load finds. The used ones only,
    # as its other loads keep.
    if getattr(model, "_weight_conversions", None):
        model._weight_conversions = [c for c in model._weight_conversions if c.was_used()]
    if lora_args.qlora:
        keep_4bit_weights_unpacked(model)
    cast_vision_inputs(model, spec)
    mask_imageless_samples(model)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)

    if not for_training:
        model.requires_grad_(False)
        eval_mode(model)
        cap_final_logits(model)
        return model, processor, spec

    if lora_args.qlora:
        from peft import prepare_model_for_kbit_training
        # freezes everything and upcasts norms to fp32 (DeepSpeed's bf16/fp16 mode casts the whole module to its
        # dtype again when it wraps it: the fp32 norms hold in fp32 runs only); checkpointing is enabled below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for p in model.parameters():  # apply_freezing decides; 4-bit weights are never trainable
            p.requires_grad_(p.is_floating_point())
    apply_freezing(model, spec, model_args)
    if lora_args.lora_r > 0:
        model = apply_lora(model, spec, model_args, lora_args)
    cap_final_logits(model)  # on LoRA's wrapper of the output layer, when adapters are on it
    if model_args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # an adapter checkpoint stays the base (merged again when needed), not its merged copy in a temp folder
    base = absolute_if_local(model_args.from_checkpoint) if Path(model_args.from_checkpoint).is_dir() and \
        is_adapter_checkpoint(model_args.from_checkpoint) and Path(path).resolve() != \
        Path(model_args.from_checkpoint).resolve() else path
    model._vlm_build_info = {"base": str(base), "model_architecture": spec.name,
                             "trust_remote_code": trust, "precision": model_args.precision,
                             **({"qlora": {"double_quant": lora_args.bnb_double_quant}} if lora_args.qlora else {})}
    model._vlm_merged_base = str(path) if str(base) != str(path) else None  # the merge of `base` trained on
    model.train()
    return model, processor, spec


def cap_final_logits(model) -> None:
    """A language model's final logit soft-capping, cap * tanh(logits / cap) (Gemma-2's, 30), which its own causal-LM
    class applies and the VLM classes holding it (a LLaVA built from parts) do not: their logits were not the language
    model's. A forward hook on the output layer (of the peft model's base, after LoRA wraps it)."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(getattr(base.config, "text_config", None) or base.config, "final_logit_softcapping", None)
    if cap:
        base.get_output_embeddings().register_forward_hook(lambda module, inputs, out: cap * torch.tanh(out / cap))


def keep_4bit_weights_unpacked(model) -> None:
    """bitsandbytes' CPU path, on a CPU with AVX512-BF16, repacks a 4-bit layer's weight in place for a bf16
    kernel at its first eval-mode forward without grad (a rollout, a reference or held-out pass), and keeps
    using that kernel in training mode after it: another function (logits moved by ~3e-3 on the tiny VLM), and
    one without an autograd formula, so no gradient flowed back through the frozen 4-bit layers to the LoRA
    weights below them (layer 0's adapter gradients were 60% off). Every 4-bit layer is kept on the plain
    dequantize-and-matmul path instead, in every mode. GPUs never take that path."""
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def cast_vision_inputs(model, spec: ArchSpec) -> None:
    """Pixel inputs reach the vision tower in its own dtype. The processors return fp32; CLIP and SigLIP
    cast inside, other towers (the tiny VLM's DPT-hybrid) do not, so bf16 / fp16 failed there. A forward
    pre-hook casts every floating-point input, to the dtype the tower's weights have at call time
    (DeepSpeed may convert them after loading)."""
    import torch

    def cast(module, args, kwargs):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        if dtype is None:
            return None
        fix = lambda x: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}

    for name in _module_names(spec.vision_prefixes):
        try:
            tower = model.get_submodule(name)
        except AttributeError:
            continue
        tower.register_forward_pre_hook(cast, with_kwargs=True)


def _module_names(prefixes) -> list[str]:
    return [p.rstrip(".") for p in prefixes]


def _bnb_config(spec: ArchSpec, model_args: ModelArgs, lora_args: LoraArgs):
    import torch
    from transformers import BitsAndBytesConfig
    compute = model_args.precision if lora_args.bnb_compute_dtype == "auto" else lora_args.bnb_compute_dtype
    # Only the language model is quantized: the vision tower, projector and lm_head stay in `precision`
    # (module names match from the start, at a module boundary).
    skip = _module_names(spec.vision_prefixes + spec.projector_prefixes) + ["lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=lora_args.bnb_double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(compute),
                              bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=skip)


def apply_freezing(model, spec: ArchSpec, model_args: ModelArgs) -> None:
    """requires_grad False for every parameter of a frozen group (longest-prefix group of its name)."""
    frozen = {g for g, flag in (("vision", model_args.freeze_vision_tower),
                                ("projector", model_args.freeze_projector),
                                ("lm", model_args.freeze_language_model)) if flag}
    for name, p in model.named_parameters():
        if spec.param_group(name) in frozen or not p.is_floating_point():
            p.requires_grad_(False)


def lora_target_regex(spec: ArchSpec, targets: str = "auto") -> str:
    """peft target_modules regex (full match on module names): the given linear names, inside the
    language model only, so vision-tower layers with the same names (q_proj, fc1...) get no adapters."""
    names = list(spec.lora_targets) if targets in ("", "auto") else [t.strip() for t in targets.split(",") if t.strip()]
    alt = "|".join(re.escape(n) for n in names)
    inside = "|".join(re.escape(p) for p in spec.lm_prefixes if p.endswith("."))
    pattern = rf"(?:{inside})(?:.*\.)?(?:{alt})"
    if "lm_head" in names:
        pattern = rf"(?:{pattern}|lm_head)"
    return pattern


def apply_lora(model, spec: ArchSpec, model_args: ModelArgs, lora_args: LoraArgs):
    """Wrap in a peft LoRA model. Groups trainable before (vision / projector, per the freeze flags)
    stay trainable; the language model's base weights freeze."""
    from peft import LoraConfig, get_peft_model
    keep = [n for n, p in model.named_parameters() if p.requires_grad and spec.param_group(n) != "lm"]
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=lora_target_regex(spec, lora_args.lora_target_modules),
                        bias="none", task_type=None)
    model = get_peft_model(model, config)
    params = dict(model.base_model.model.named_parameters())
    for n in keep:
        params[n].requires_grad_(True)
    return model


def enable_gradient_checkpointing(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if getattr(base.config, "text_config", None) is not None:
        base.config.text_config.use_cache = False
    # transformers hooks the input embeddings of EVERY sub-model to require grad (only reentrant
    # checkpointing needs that); a vision tower's embeddings may return a ModelOutput (DPT-hybrid, the
    # tiny VLM's), which that hook cannot handle. Keep one such hook, on the token embeddings.
    for hook in getattr(base, "_require_grads_hooks", []):
        hook.remove()
    base._require_grads_hooks = [base.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True))]


def non_lora_trainables(model) -> dict:
    """Trainable non-adapter parameters of a peft model, by their base-model names (cloned, on CPU)."""
    return {n.removeprefix("base_model.model."): p.detach().to("cpu").clone()
            for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def set_chat_template(processor, template_arg: str) -> str | None:
    """--template FILE (not "auto": the processor's own) becomes the processor's (and its tokenizer's)
    template, so the checkpoint saved with it renders prompts at generation (predict, PPO rollouts) as
    they were in training. Returns the override's text, or None."""
    template = Path(template_arg).read_text() if template_arg and template_arg != "auto" else None
    if template:
        processor.chat_template = template
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and tokenizer is not processor:
            tokenizer.chat_template = template
    return template


WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def saved_model_files(out_dir: str | Path, weights: bool = True, adapter: bool = True) -> list[Path]:
    """The files and folders of a model `save_model` wrote into out_dir: full weights and/or the adapter folder."""
    out_dir = Path(out_dir)
    found = [f for pattern in WEIGHT_FILES for f in out_dir.glob(pattern)] if weights else []
    return found + ([out_dir / ADAPTER_SUBDIR] if adapter and (out_dir / ADAPTER_SUBDIR).exists() else [])


def remove_paths(paths) -> None:
    import shutil
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def keep_merged_base(merged: Path, out_dir: Path) -> None:
    """LoRA trained from the LoRA checkpoint in out_dir and saved there: its base is that checkpoint merged (in the
    model cache), and its adapters are about to replace the ones that made it. The merge's config and weights are
    written into out_dir first, so the new adapters sit beside their own base's full weights."""
    import shutil
    remove_paths(saved_model_files(out_dir, adapter=False))
    for f in saved_model_files(merged, adapter=False) + [merged / "config.json", merged / "generation_config.json"]:
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)


def save_model(model, processor, out_dir: str | Path, state_dict: dict | None = None) -> str:
    """Save with safetensors. A plain model: config + weights + processor in out_dir. A peft model:
    adapters (+ non-LoRA trainables + how the base was loaded) in out_dir/adapter, processor in
    out_dir; `merge_lora(out_dir, dest)` or `load_model_and_processor` on out_dir merges them.
    A model saved there before is removed (an adapter folder left beside new full weights was loaded instead of
    them), except the full weights adapters trained from out_dir itself need as base, and so is a reward model's
    value head and record.
    state_dict: a plain model's weights gathered elsewhere (ZeRO-3: Strategy.save_hf), written instead of its
    parameters."""
    from safetensors.torch import save_file

    from training.rm.model import HEAD_FILE, INFO_FILE, LENGTH_HEAD_FILE

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a reward model saved here before: its head and record would make this model read as one (a reward model's
    # save_pretrained writes them anew after its backbone)
    remove_paths([out_dir / INFO_FILE, out_dir / HEAD_FILE, out_dir / LENGTH_HEAD_FILE])
    lora = hasattr(model, "peft_config")
    base = (getattr(model, "_vlm_build_info", None) or {}).get("base")
    own = lora and base and Path(base).resolve() == out_dir.resolve()  # adapters beside their own base keep it
    if own and getattr(model, "_vlm_merged_base", None):
        keep_merged_base(Path(model._vlm_merged_base), out_dir)
    # an earlier adapter folder goes whole: peft writes over its adapters, but another run's non-LoRA trainables
    # left there were merged into this model on every load
    remove_paths(saved_model_files(out_dir, weights=lora and not own, adapter=True))
    if lora:
        adapter = out_dir / ADAPTER_SUBDIR
        model.save_pretrained(adapter, safe_serialization=True)
        extra = non_lora_trainables(model)
        if extra:
            save_file({k: v.contiguous() for k, v in extra.items()}, str(adapter / NON_LORA_FILE))
        info = getattr(model, "_vlm_build_info", None) or {
            "base": model.peft_config["default"].base_model_name_or_path}
        (adapter / BUILD_INFO_FILE).write_text(json.dumps(info, indent=1))
    else:
        model.save_pretrained(out_dir, safe_serialization=True, **({} if state_dict is None else
                                                                   {"state_dict": state_dict}))
    if processor is not None:
        processor.save_pretrained(out_dir)
    written = saved_model_files(out_dir, weights=not lora, adapter=lora)
    umask_mode(*(f for p in written for f in ([p] if p.is_file() else p.glob("*.safetensors"))
                 if f.suffix == ".safetensors"))
    return str(out_dir)
