"""One config definition per concept, shared by every stage's command line.

Each dataclass is a concept (model, LoRA, data, optimisation, DeepSpeed, checkpointing, logging);
a stage lists the concepts it needs and `parse_config` builds one argparse parser from them.
Argument names follow Vision-LLM-Alignment where the concept is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


REF_CACHE_FOLDER = "ref_logps"  # DPO's cached reference log-probs: beside the data (training.dpo.refcache)


@dataclass
class ModelArgs:
    from_checkpoint: str = _f("", "Model to start from: local path or Hub id. Empty: the embedded tiny VLM.")
    model_architecture: str = _f("auto", "Architecture override (auto detects it from the config).")
    template: str = _f("auto", "Chat template override: a Jinja template FILE (auto: the processor's own; a "
                               "processor without one needs a FILE).")
    vision_tower: str = _f("", "Build from parts: vision encoder (CLIP/SigLIP path, or "
                               "open_clip:NAME[:FILE.safetensors]).")
    language_model: str = _f("", "Build from parts: causal LM path.")
    freeze_vision_tower: bool = _f(False, "Freeze the vision encoder.")
    freeze_projector: bool = _f(False, "Freeze the multimodal projector.")
    freeze_language_model: bool = _f(False, "Freeze the language model (projector-only pre-training).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    precision: str = _f("fp32", "fp32 | bf16 | fp16", choices=["fp32", "bf16", "fp16"])
    trust_remote_code: bool = _f(False, "Allow model code from the checkpoint (off unless you ask).")


@dataclass
class LoraArgs:
    lora_r: int = _f(0, "LoRA rank; 0 disables LoRA.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("auto", "Comma-separated module names, or auto (per architecture).")
    qlora: bool = _f(False, "Load the base model in 4-bit NF4 (bitsandbytes) and train LoRA adapters.")
    bnb_double_quant: bool = _f(True, "Double quantization of the 4-bit constants.")
    bnb_compute_dtype: str = _f("auto", "Compute dtype for 4-bit layers (auto: from --precision).")


@dataclass
class DataArgs:
    data_path: str = _f("", "Training data: file(s) (json, jsonl, parquet), a saved dataset dir, or a Hub id. "
                            "Comma-separated for several. Empty: the embedded world.")
    image_folder: str = _f("", "Image root; image paths must resolve inside it.")
    eval_data_path: str = _f("", "Held-out data (same formats), evaluated every --eval_steps and after training: "
                                 "SFT's loss, the reward model's pairwise accuracy (default there: the embedded "
                                 "world's held-out pairs), the DPO family's loss, rewards and log-probs (default "
                                 "there too, but for listwise; not OPA-DPO). PPO takes none: score its model "
                                 "with run_predict.sh --benchmark.")
    max_seq_len: int = _f(512, "Maximum tokens per sample; response text is cut, never image tokens.")
    skip_bad_rows: bool = _f(False, "Skip bad rows and count them in bad_rows.json instead of stopping.")
    encoded_cache_mb: int = _f(2048, "DPO family: keep encoded samples (tokens + pixel inputs) in memory up to "
                                     "this many MiB, so the reference pass and later epochs encode once (0: off).")
    world_dir: str = _f("data/world", "Where the embedded world is generated (when no data_path).")
    world_seed: int = _f(0, "Seed of the embedded world.")


@dataclass
class OptimArgs:
    per_device_train_batch_size: int = _f(8, "Micro batch per process.")
    per_device_eval_batch_size: int = _f(16, "Eval batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro batches per optimizer step.")
    optimizer: str = _f("adamw", "adamw | sgd (plain SGD: updates linear in the gradient)", choices=["adamw", "sgd"])
    learning_rate: float = _f(1e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not of biases and norm weights, as transformers' Trainer).")
    num_train_epochs: float = _f(1.0, "Epochs over the training data (a part epoch: its steps, a part step rounded up, "
                                          "as transformers' Trainer).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: from epochs).")
    lr_scheduler_type: str = _f("cosine", "cosine | linear | constant | constant_with_warmup (transformers' "
                                          "get_scheduler)", choices=["cosine", "linear", "constant",
                                                                     "constant_with_warmup"])
    num_warmup_steps: int = _f(0, "Linear warm-up steps (from 0 at the first step, as transformers').")
    warmup_ratio: float = _f(0.0, "Warm-up as a share of all steps, rounded up (used when num_warmup_steps is 0).")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0 disables).")
    seed: int = _f(1234, "Training seed.")


@dataclass
class DeepSpeedArgs:
    zero_stage: int = _f(0, "ZeRO stage 0-3.", choices=[0, 1, 2, 3])
    offload: bool = _f(False, "Offload optimizer states (and ZeRO-3 parameters) to CPU.")
    deepspeed_config: str = _f("", "A DeepSpeed JSON: its settings win where it sets them (ZeRO, clipping, "
                                   "fp16/bf16 details, ...), ours fill the rest and its \"auto\" values; batch sizes, "
                                   "the optimizer and its schedule come from the flags: a file that sets them "
                                   "otherwise, or a ZeRO stage or precision that contradicts a flag, stops the run.")
    local_rank: int = _f(-1, "Set by the deepspeed launcher.")


@dataclass
class RunArgs:
    output_dir: str = _f("output/run", "Where the checkpoint, metrics and logs go.")
    logging_steps: int = _f(10, "Log every N optimizer steps: each row holds each metric's mean over those of the "
                                "steps that report it (the learning rate, PPO's KL coefficient: the logged step's).")
    eval_steps: int = _f(0, "Evaluate --eval_data_path every N steps (0: at the end only).")
    save_steps: int = _f(0, "Save a resumable checkpoint every N optimizer steps (0: none; the finished model "
                            "is saved either way).")
    resume: bool = _f(False, "Continue from the last checkpoint in output_dir.")
    stop_after_steps: int = _f(0, "Save a resumable checkpoint and exit after this many steps, as if "
                                  "interrupted (0: run to the end). Continue with --resume.")
    save_total_limit: int = _f(2, "Keep this many resumable checkpoints (0 or less: keep every one, as transformers).")
    progress: bool = _f(True, "Show a progress bar.")
    figure_dir: str = _f("figure", "Plots of the run's metrics go here (named after output_dir).")


def refuse_held_out(data: DataArgs, run: RunArgs, stage: str) -> None:
    """For stages without a held-out evaluation: stop rather than ignore --eval_data_path / --eval_steps."""
    if data.eval_data_path or run.eval_steps:
        raise SystemExit(f"{stage} evaluates nothing held out during training (--eval_data_path / --eval_steps): "
                         "score the saved model with `bash run_predict.sh --benchmark NAME --model_path OUTPUT_DIR`")


def require_held_out(data: DataArgs, run: RunArgs) -> None:
    """For stages with one: --eval_steps needs held-out data (after the stage's defaults are filled in)."""
    if run.eval_steps and not data.eval_data_path:
        raise SystemExit("--eval_steps: give the held-out data to evaluate with --eval_data_path")
    from training.data.readers import DataFormatError, expand_paths, split_paths  # (a folder: its data files)

    def sources(paths: str) -> set[str]:
        try:
            return {os.path.realpath(x) for x in expand_paths(paths)}
        except DataFormatError:  # (the reader says what is wrong with it when it reads)
            return {os.path.realpath(x) for x in split_paths(paths)}
    both = sources(data.eval_data_path) & sources(data.data_path) if data.eval_data_path else set()
    if both:  # its figures would be reported as held-out ones
        raise SystemExit(f"--eval_data_path {', '.join(sorted(both))} is training data too (--data_path): give "
                         "held-out data")


@dataclass
class RMArgs:
    factual: bool = _f(True, "Fact-RLHF: give the reward model each sample's facts (captions, ground-truth "
                             "objects, the correct option) in a factual block; rows without facts are bad rows.")
    captions_file: str = _f("", "LLaVA-RLHF image_to_caption.json (image -> captions): added to each row's facts.")
    rank_loss: str = _f("auto", "auto (Bradley-Terry for pairs, Plackett-Luce for longer ranked lists) | "
                                "bradley_terry (every pair of a ranking) | plackett_luce",
                        choices=["auto", "bradley_terry", "plackett_luce"])
    margin: float = _f(0.0, "Bradley-Terry margin: r_chosen should exceed r_rejected by this much (a TRL-format "
                            "row's `margin` column replaces it for that row, as TRL's RewardTrainer reads it).")
    center_coef: float = _f(1e-3, "LLaVA-RLHF reward centering: + coef * |mean(r_chosen + r_rejected)| (0: off).")
    length_head: bool = _f(False, "ODIN (arXiv 2402.07319): a second linear head, trained to carry the reward's "
                                  "correlation with response length, beside the quality head, which is trained to carry "
                                  "none; the ranking loss sees their sum, and everything that reads the reward model "
                                  "afterwards (PPO, its critic, best-of-n, evaluation) reads the quality head alone.")
    length_coef: float = _f(1.0, "ODIN: weight of |rho(r_quality, length)| - rho(r_length, length) (Pearson over "
                                 "each micro-batch's responses).")
    orthogonal_coef: float = _f(1.0, "ODIN: weight of |w_quality . w_length|, the two heads' weights kept orthogonal.")
    mismatched_pairs: float = _f(0.0, "Add, for this fraction of the training lists, a pair: the list's best response "
                                      "above another list's best response to the same prompt, both read with this "
                                      "list's image and facts (training.rm.mismatch), so that only checking a "
                                      "response against the image and facts ranks it (0: off). On the embedded "
                                      "world it mends benchmarks.rm_errors' omit and swap rows but ranks the SFT "
                                      "model's own answers worse, and PPO from it cuts hallucinations less "
                                      "(benchmarks/results_history.md, stop 39).")
    fast_path: bool = _f(True, "One row per ranked list: image and prompt computed once for all its candidates "
                               "(DPO's shared-prefix layout, on the families it covers); --no-fast_path runs one "
                               "full sequence per candidate.")


@dataclass
class DPOArgs:
    loss_type: str = _f("sigmoid", "sigmoid (DPO) | cdpo (label smoothing) | ipo | orpo (reference-free) | "
                                   "listwise (Plackett-Luce over ranked candidates) | opa (OPA-DPO on pairs made "
                                   "by run_opa_dpo.sh, or the published OPA-DPO set)",
                        choices=["sigmoid", "cdpo", "ipo", "orpo", "listwise", "opa"])
    beta: float = _f(0.1, "DPO beta (IPO: tau). Scales the implicit reward beta * (logp - ref_logp).")
    label_smoothing: float = _f(0.1, "cDPO: probability that a preference label is flipped (loss_type cdpo).")
    ipo_average: bool = _f(True, "IPO on per-token mean log-ratios (TRL's variant) instead of sums.")
    orpo_lambda: float = _f(0.1, "ORPO: weight of the odds-ratio term (TRL's beta; paper 0.1).")
    sft_weight: float = _f(0.0, "Add -sft_weight * logp(chosen) to DPO losses (RLAIF-V); 0 disables.")
    precompute_ref: bool = _f(True, "Compute reference log-probs once before training and cache them with "
                                    "the data; --no-precompute_ref computes them every step.")
    ref_cache_dir: str = _f("", f"Where reference log-probs are cached (default: {REF_CACHE_FOLDER}/ beside the "
                                "data, else in output_dir).")
    fast_path: bool = _f(True, "One row per pair: image and prompt computed once for chosen and rejected "
                               "(shared-prefix mask; LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM and Qwen2-VL / 2.5-VL; "
                               "Llama-3.2-Vision always runs the plain layout); --no-fast_path runs one full "
                               "sequence per response.")
    disable_dropout: bool = _f(True, "Turn dropout off in the policy (the log-ratios are then deterministic).")
    opa_c_std: float = _f(1.0, "OPA-DPO: weight of the ground-truth pairs (1 and 3).")
    opa_c_ai: float = _f(1.0, "OPA-DPO: weight of the expert-revised pairs (2 and 4).")
    opa_anchor: str = _f("paper", "OPA-DPO anchor: paper (every chosen reward pushed up, mDPO) | published "
                                  "(the released code's signs: revised rewards pushed down)",
                         choices=["paper", "published"])
    opa_mask_ratio: float = _f(0.3, "OPA-DPO: share of pixels set to the mean colour in the masked image.")
    opa_token_level: bool = _f(False, "OPA-DPO: the released code's per-token sigmoid instead of the per-sequence "
                                      "form (needs --no-precompute_ref: per-token reference log-probs).")


def _arg_type(tp):
    if tp in (int, float, str):
        return tp
    return str


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        tp, meta = hints[f.name], dict(f.metadata)
        kw = {"default": f.default, "help": meta.get("help", "")}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if tp is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(f"--{f.name}", type=_arg_type(tp), **kw)


def _profile_value_problem(action: argparse.Action, value) -> str:
    """What is wrong with a profile's value for this argument ("" when nothing): what the command line would refuse
    (a profile's "false" was a true string, a choice outside the list passed). Text for a number goes through the
    option's type, as argparse takes a text default; null stays for an option whose default is none."""
    if value is None and action.default is None:
        return ""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "" if isinstance(value, bool) else "is not true or false (JSON true / false)"
    want = action.type or str
    if isinstance(value, str) and want in (int, float):
        try:
            value = want(value)
        except ValueError:
            return f"is not {'a number' if want is float else 'an integer'}"
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(want, lambda v: True)
    if not ok(value):
        return f"is not {'a number' if want is float else 'an integer' if want is int else 'text'}"
    if action.choices is not None and value not in action.choices:
        return f"is not one of {list(action.choices)}"
    return ""


def read_profile(path: str) -> dict:
    """A --config profile: a JSON object of argument values; one that cannot be read stops the run, naming it."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--config {path}: {e}")
    if not isinstance(profile, dict):
        raise SystemExit(f'--config {path}: not a JSON object of argument values ({{"learning_rate": 2e-5, ...}})')
    return profile


def parse_config(classes: dict[str, type], argv=None, defaults: dict | None = None,
                 description: str = "") -> dict:
    """Parse argv into {name: dataclass instance}. `defaults` overrides dataclass defaults per stage."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default="", help="JSON file of argument values (a profile in configs/); "
                                                     "command-line arguments override it")
    for cls in classes.values():
        add_dataclass_args(parser, cls)
    if defaults:
        parser.set_defaults(**defaults)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        profile = read_profile(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(profile) - known)
        if unknown:
            raise SystemExit(f"{pre.config}: unknown arguments {unknown}")
        actions = {a.dest: a for a in parser._actions}
        for key, value in profile.items():  # set_defaults takes values as they are: no type or choice check
            problem = _profile_value_problem(actions[key], value)
            if problem:
                raise SystemExit(f"{pre.config}: {key}: {value!r} {problem}")
        parser.set_defaults(**profile)
    ns = vars(parser.parse_args(argv))
    odd = [f"--{k} {v}" for k, v in ns.items() if isinstance(v, float) and not math.isfinite(v)]
    if odd:  # float() reads "nan" and "inf": a NaN learning rate trained NaN weights, found at the first checkpoint
        raise SystemExit(f"{', '.join(odd)}: give a finite number")
    cfg = {name: cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)}) for name, cls in classes.items()}
    for o in (v for v in cfg.values() if isinstance(v, OptimArgs)):  # before any model loads
        check_optim_settings(o)
    for d in (v for v in cfg.values() if isinstance(v, DataArgs)):  # below: every row a bad row; no cache, silently
        bad = [f"--max_seq_len {d.max_seq_len}: give N >= 1 tokens"] if d.max_seq_len < 1 else []
        bad += [f"--encoded_cache_mb {d.encoded_cache_mb}: give N >= 0 (0: off)"] if d.encoded_cache_mb < 0 else []
        if d.image_folder and Path(d.image_folder).is_file():  # each row's image was "file not found" under it
            bad.append(f"--image_folder {d.image_folder}: a file; give the folder the data's image paths are under")
        if bad:
            raise SystemExit("; ".join(bad))
    for lora in (v for v in cfg.values() if isinstance(v, LoraArgs)):
        check_lora_settings(lora)
    for r in (v for v in cfg.values() if isinstance(v, RunArgs)):
        check_step_counts(r)
        refuse_another_stages_model(r.output_dir, set(cfg))
    for a in (v for v in cfg.values() if isinstance(v, DPOArgs)):
        check_loss_settings(a)
    for rm in (v for v in cfg.values() if isinstance(v, RMArgs)):  # LLaVA-RLHF's centering: 0 is off
        if rm.center_coef < 0:  # it paid the model for moving its rewards' mean away from 0
            raise SystemExit(f"--center_coef {rm.center_coef}: give a value >= 0 (0: no centering)")
        for flag in ("length_coef", "orthogonal_coef"):  # a negative one pays for the very correlation it removes
            if getattr(rm, flag) < 0:
                raise SystemExit(f"--{flag} {getattr(rm, flag)}: give a value >= 0 (it weighs an ODIN term of "
                                 "--length_head)")
    return cfg


STAGE_NAMES = (("ppo", "PPO"), ("rm", "reward-model"), ("dpo", "DPO"))  # a run_config.json's sections -> its stage


def stage_of(sections) -> str:
    return next((name for key, name in STAGE_NAMES if key in sections), "SFT")


def refuse_another_stages_model(output_dir: str, sections: set) -> None:
    """An --output_dir holding another stage's finished model (its run_config.json of another stage beside its
    weights): a fresh run there removed that model at its start (DPO pointed at output/sft deleted the SFT model the
    later stages load). Refused before any model loads; a rerun of the same stage there replaces its model, as before."""
    out = Path(output_dir)
    try:
        earlier = stage_of(set(json.loads((out / "run_config.json").read_text())))
    except (OSError, ValueError, TypeError):
        return
    from training.model.builder import saved_model_files
    if earlier == stage_of(sections) or not saved_model_files(out):
        return
    raise SystemExit(f"--output_dir {out}: holds a finished {earlier} run's model (its run_config.json and weights), "
                     "which this run would remove; give another --output_dir, or remove that folder first")


def seed_problem(seed: int) -> str:
    """What is wrong with a --seed ("" when nothing): the project's per-step and per-sample seeds (seed x 1,000,003
    + ...) overflowed torch's generator from ~1e13 on, after the model had loaded; numpy takes none below 0."""
    return "" if 0 <= seed < 2**32 else f"--seed {seed}: give a seed in [0, 2**32)"


def check_optim_settings(o: OptimArgs) -> None:
    """The optimisation settings that train at all: some epochs (0 trained one step), batch sizes of at least 1
    (0 stopped the run on a division by zero after the model had loaded); no negative learning rate, weight decay
    (it grew the weights) or clipping norm (DeepSpeed clips above 0 only: clipping was off)."""
    warmup_steps(o, 1)
    if o.max_steps <= 0 and not o.num_train_epochs > 0:  # it trained one step
        raise SystemExit(f"--num_train_epochs {o.num_train_epochs}: give a number of epochs > 0, or --max_steps N")
    bad = [f"--{k} {getattr(o, k)}: give N >= 1" for k in ("per_device_train_batch_size", "per_device_eval_batch_size",
                                                           "gradient_accumulation_steps") if getattr(o, k) < 1]
    bad += [f"--{k} {getattr(o, k)}: give a value >= 0" for k in ("learning_rate", "weight_decay", "max_grad_norm")
            if getattr(o, k) < 0]
    bad += [seed_problem(o.seed)] if seed_problem(o.seed) else []
    if bad:
        raise SystemExit("; ".join(bad))


def check_lora_settings(a: LoraArgs) -> None:
    """LoRA settings that train adapters: rank >= 1 (0: no LoRA; a negative rank trained the whole model instead),
    alpha > 0 (the adapters' scale alpha / r: 0 left them out and untrained), dropout in [0, 1) (a negative one was
    none, 1 or more stopped in torch after the model had loaded)."""
    bad = [f"--lora_r {a.lora_r}: give a rank >= 1, or 0 for no LoRA"] if a.lora_r < 0 else []
    if a.lora_r > 0 and not a.lora_alpha > 0:
        bad.append(f"--lora_alpha {a.lora_alpha}: give alpha > 0 (the adapters are scaled by alpha / r)")
    if a.lora_r > 0 and not 0 <= a.lora_dropout < 1:
        bad.append(f"--lora_dropout {a.lora_dropout}: give a probability in [0, 1)")
    if bad:
        raise SystemExit("; ".join(bad))


def check_loss_settings(a: DPOArgs) -> None:
    """The DPO family's settings that train at all: beta > 0 (IPO divides by it; a negative one prefers the rejected
    responses), cDPO's flip probability in [0, 0.5), SFT, ORPO and OPA-DPO weights >= 0, OPA-DPO's masked share of
    pixels in [0, 1] (-0.1 masked 90% of them, 1.5 all, without a word)."""
    bad = [f"--beta {a.beta}: give beta > 0"] if not a.beta > 0 else []
    if a.loss_type == "cdpo" and not 0 <= a.label_smoothing < 0.5:
        bad.append(f"--label_smoothing {a.label_smoothing}: cDPO's probability that a label is flipped is in [0, 0.5)")
    bad += [f"--{k} {getattr(a, k)}: give a weight >= 0" for k in ("sft_weight", "orpo_lambda", "opa_c_std", "opa_c_ai")
            if getattr(a, k) < 0]
    if a.loss_type == "opa" and not 0 <= a.opa_mask_ratio <= 1:
        bad.append(f"--opa_mask_ratio {a.opa_mask_ratio}: give a share of the pixels in [0, 1]")
    if bad:
        raise SystemExit("; ".join(bad))


def check_step_counts(run: RunArgs) -> None:
    """--logging_steps is at least 1 (0 stopped the run at its first step, on a division by zero, after the models
    loaded); --eval_steps, --save_steps and --stop_after_steps are at least 0 (0: none); --output_dir and
    --figure_dir are folders or still to make."""
    if run.logging_steps < 1:
        raise SystemExit(f"--logging_steps {run.logging_steps}: log every N >= 1 optimizer steps (the last step is "
                         "logged either way)")
    bad = [f"--{k} {getattr(run, k)}" for k in ("eval_steps", "save_steps", "stop_after_steps")
           if (getattr(run, k) or 0) < 0]  # (None: a stage's default, filled in later: the reward model's eval_steps)
    if bad:
        raise SystemExit(f"{', '.join(bad)}: give N >= 0 (0: none)")
    for flag in ("output_dir", "figure_dir"):  # a file there stopped the run on pathlib's FileExistsError, models loaded
        file = file_in_the_way(getattr(run, flag))
        if file:
            raise SystemExit(f"--{flag} {getattr(run, flag)}: {file} is a file; give a folder (made when missing)")


def file_in_the_way(folder: str) -> str:
    """The path (folder itself, or a folder above it) that exists as something other than a folder, "" when none:
    a folder there could not be made."""
    path = Path(folder)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return "" if p.is_dir() else str(p)
    return ""


def warmup_steps(o: OptimArgs, total: int) -> int:
    """The warm-up's length: num_warmup_steps, else warmup_ratio of `total` rounded up (as TrainingArguments);
    "constant" takes none (refused: constant_with_warmup is that). A negative count started the cosine part way
    down, a negative ratio was none, one above 1 never reached the peak: refused, as transformers does."""
    if o.num_warmup_steps < 0:
        raise SystemExit(f"--num_warmup_steps {o.num_warmup_steps}: give N >= 0")
    if not 0 <= o.warmup_ratio <= 1:
        raise SystemExit(f"--warmup_ratio {o.warmup_ratio}: give a share in [0, 1] of all steps")
    if o.lr_scheduler_type == "constant" and (o.num_warmup_steps or o.warmup_ratio):
        raise SystemExit("--lr_scheduler_type constant takes no warm-up: use constant_with_warmup, or give "
                         "--num_warmup_steps 0 (and no --warmup_ratio)")
    return o.num_warmup_steps or math.ceil(o.warmup_ratio * total)


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({k: dataclasses.asdict(v) for k, v in cfg.items()}, indent=1))
