"""The DeepSpeed config a run gets: the flags' settings, a user's --deepspeed_config merged over them (checked
against the flags), and a frozen model's ZeRO-3 config."""
from __future__ import annotations

import json
import os
from pathlib import Path

from training.config import DeepSpeedArgs, OptimArgs

BUCKET_DEFAULT = 500_000_000  # DeepSpeed's ZeRO reduce / allgather bucket, in elements


def offloads_optimizer(zero: dict) -> bool:
    """Whether a zero_optimization config offloads the optimizer (to the CPU or NVMe): DeepSpeed then takes its own CPU
    Adam only. A user config's NVMe offload got torch's AdamW, which DeepSpeed refused as the engine started; its CPU
    offload turned --offload on, which offloaded the parameters too at stage 3."""
    return (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")


def drop_auto(cfg: dict) -> dict:
    """A DeepSpeed config without its "auto" values (Hugging Face's convention: "the trainer fills this in"), at every
    level: the flags fill them. Passed on, DeepSpeed took "auto" for a setting: bf16 {"enabled": "auto"} turned bf16
    off under --precision bf16, gradient_clipping "auto" failed at the first step, and fp16 / bf16 "auto" beside
    --precision was refused as a contradiction."""
    return {k: drop_auto(v) if isinstance(v, dict) else v for k, v in cfg.items() if v != "auto"}


OPTIMIZER_TYPES = {"adamw": ("adam", "adamw"), "sgd": ("sgd",)}  # --optimizer -> DeepSpeed's names that agree


ZERO_STAGES = ("0", "1", "2", "3")  # a --deepspeed_config's zero_optimization.stage, as an integer or its text


def unfollowed_settings(cfg: dict, optimizer: str) -> list[str]:
    """What a DeepSpeed config's "optimizer" and "scheduler" sections set ("auto" values dropped before) that a run
    would not do: the optimizer and the learning-rate schedule are the flags', and DeepSpeed uses the ones it is
    given over its config's without a word (a file's lr 1e-5 ran at --learning_rate)."""
    opt, sched = cfg.get("optimizer") or {}, cfg.get("scheduler") or {}
    out = [f"optimizer.params.{k}" for k in opt.get("params") or {}]
    if opt.get("type") and str(opt["type"]).lower() not in OPTIMIZER_TYPES[optimizer]:
        out.insert(0, f"optimizer.type {opt['type']}")
    return out + ([f"scheduler.type {sched['type']}"] if sched.get("type") else []) + [
        f"scheduler.params.{k}" for k in sched.get("params") or {}]


def read_user_config(d: DeepSpeedArgs, o: OptimArgs, precision: str) -> dict:
    """--deepspeed_config: its settings win over ours where it sets them; a ZeRO stage there becomes
    the run's (the stages' code depends on it); a conflict with a flag is an error, not a silent pick."""
    if not d.deepspeed_config:
        return {}
    try:
        cfg = json.loads(Path(d.deepspeed_config).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--deepspeed_config {d.deepspeed_config}: {e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"--deepspeed_config {d.deepspeed_config}: not a JSON object of DeepSpeed settings")
    cfg = drop_auto(cfg)
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if not isinstance(zero, dict) or not (stage is None or type(stage) in (int, str) and str(stage) in ZERO_STAGES):
        raise SystemExit(f"{d.deepspeed_config}: zero_optimization {zero!r:.60}: give an object, its stage 0-3")
    if stage is not None and int(stage) != d.zero_stage:
        if d.zero_stage:
            raise SystemExit(f"{d.deepspeed_config}: ZeRO stage {stage}, but --zero_stage {d.zero_stage}: "
                             "give the stage once")
        d.zero_stage = int(stage)
    for kind, names in (("fp16", ("fp16",)), ("bf16", ("bf16", "bfloat16"))):
        enabled = [cfg[n].get("enabled") for n in names if isinstance(cfg.get(n), dict) and "enabled" in cfg[n]]
        if any(enabled) and precision != kind or enabled and not any(enabled) and precision == kind:
            raise SystemExit(f"{d.deepspeed_config} {'enables' if any(enabled) else 'disables'} {kind}, but "
                             f"--precision is {precision}: make them agree")
    for k, v in ((k, cfg.get(k) or {}) for k in ("optimizer", "scheduler")):  # (else an AttributeError below)
        if not isinstance(v, dict) or not isinstance(v.get("params") or {}, dict):
            raise SystemExit(f"{d.deepspeed_config}: {k} {v!r:.60}: give an object, its params an object")
    unfollowed = unfollowed_settings(cfg, o.optimizer)
    if unfollowed:
        raise SystemExit(f"{d.deepspeed_config}: {', '.join(unfollowed)}: the optimizer and its schedule come from "
                         "the flags (--optimizer, --learning_rate, --weight_decay, --lr_scheduler_type, "
                         "--num_warmup_steps / --warmup_ratio): remove them (or make them \"auto\")")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for key, ours in (("train_micro_batch_size_per_gpu", o.per_device_train_batch_size),
                      ("gradient_accumulation_steps", o.gradient_accumulation_steps),
                      ("train_batch_size", o.per_device_train_batch_size * o.gradient_accumulation_steps * world)):
        if key in cfg and cfg[key] != ours:
            raise SystemExit(f"{d.deepspeed_config}: {key} {cfg[key]!r} differs from the run's {ours}: set "
                             "batch sizes with --per_device_train_batch_size / --gradient_accumulation_steps")
    return cfg


def engine_config(d: DeepSpeedArgs, o: OptimArgs, precision: str, user: dict, world_size: int,
                  n_trainable: int | None = None) -> dict:
    """The trained model's config: the flags' settings, `user` (the checked --deepspeed_config) over them.
    n_trainable: the trained parameters' count. ZeRO 1-2 then reduce and gather in buckets no larger than
    those (DeepSpeed's default, 5e8 elements, is a 1 GB fp16 buffer per device even for LoRA's few weights)."""
    zero = {"stage": d.zero_stage}
    if n_trainable and d.zero_stage in (1, 2):
        # a multiple of 1024: DeepSpeed wants the allgather bucket aligned for NCCL
        bucket = min(BUCKET_DEFAULT, -(-n_trainable // 1024) * 1024)
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket
    if d.offload and d.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": o.per_device_train_batch_size,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "train_batch_size": o.per_device_train_batch_size * o.gradient_accumulation_steps * world_size,
        "gradient_clipping": user.get("gradient_clipping", o.max_grad_norm),
        "zero_optimization": {**zero, **user.get("zero_optimization", {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    cfg = {**user, **cfg}  # the user's other settings (communication, activation checkpointing, ...)
    if precision == "bf16":  # DeepSpeed reads "bfloat16" (the old name) only without a "bf16" section
        cfg["bf16"] = {"enabled": True, **cfg.pop("bfloat16", {}), **user.get("bf16", {})}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, **user.get("fp16", {})}
    return cfg


def frozen_engine_config(d: DeepSpeedArgs, user_config: dict, run_config: dict) -> dict:
    """A frozen model's ZeRO-3 config: its parameters partitioned as the trained model's (`run_config`; offloaded to
    the CPU with --offload or a user config's offload_param, its other zero_optimization settings applied)."""
    user = user_config.get("zero_optimization", {})
    # to the CPU, never to the user's NVMe folder: DeepSpeed clears an engine's swap folder as it starts, and
    # the frozen engines would share it
    offload = d.offload or "offload_param" in user
    zero = {"stage": 3, **({"offload_param": {"device": "cpu"}} if offload else {})}
    # the run's bf16 / fp16 section: zero.Init builds the partitions in the dtype it names (fp32 without one,
    # which doubled a bf16 reference's memory and made it compute in another precision than the policy)
    precision = {k: v for k, v in run_config.items() if k in ("bf16", "fp16")}
    return {"train_micro_batch_size_per_gpu": 1, **precision, "zero_optimization": {
        **zero, **{k: v for k, v in user.items() if k not in ("offload_optimizer", "offload_param")}}}
