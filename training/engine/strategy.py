"""DeepSpeed, wrapped once: distributed setup, config, engine, backward/step, save and resume.

Every stage goes through this object; nothing else imports deepspeed. On a machine without a GPU
DS_ACCELERATOR=cpu is set (run_*.sh does it too) and ranks talk over gloo.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from training.config import DeepSpeedArgs, OptimArgs, warmup_steps
from training.files import write_text_atomic


def setup_environment() -> None:
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("DS_ACCELERATOR") == "cpu":  # tensors live in malloc'd host memory: reuse freed blocks
        from training.engine.cpu_memory import keep_freed_memory
        keep_freed_memory()


_CRASHED = False


def note_failed_exit() -> None:
    """This rank is leaving on an error: its exit handler must not wait for ranks that may never arrive."""
    global _CRASHED
    _CRASHED = True


def _note_crash(*exc) -> None:
    note_failed_exit()
    _PREVIOUS_HOOK(*exc)


_PREVIOUS_HOOK = sys.excepthook


def close_distributed(timeout_s: float = 120.0) -> None:
    """At exit, every rank waits for the others, then the process group is destroyed. Without it the first rank
    to finish (rank 0 holds the TCP store) tore its side down while another was still finishing, and that one
    could abort ("terminate called without an active exception") after its work was done. Over gloo the wait is
    a monitored barrier with a timeout; NCCL's group is destroyed without one (a barrier there cannot time out).
    A rank leaving on an uncaught exception or an error exit (`run_stage`) does not wait (the others may be inside
    another collective and the launcher stops them). Errors on this way out are ignored."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() or _CRASHED:
        return
    try:
        if torch.distributed.get_world_size() > 1 and torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; a failed wait must not mask the run's own outcome
        pass


def rotate_checkpoints(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (all with keep <= 0) and none after it."""
    import shutil
    tags = sorted((p for p in root.glob("step*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    later = [p for p in tags if int(p.name[4:]) > step]
    upto = [p for p in tags if int(p.name[4:]) <= step]
    for old in later + (upto[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce creates for `rank` (shm.cpp: <prefix>_<uid>_<master
    addr>_<master port>_<rank>; only when the launcher set LOCAL_SIZE = world size)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_names() -> None:
    """DeepSpeed's CPU shared-memory all-reduce gives each rank a 66 MB segment in /dev/shm and never
    unlinks it, so every launched CPU run left world_size x 66 MB of RAM-backed files behind (here 20 GB
    after a day of runs, until compiles were OOM-killed and two-rank launches hung). init_distributed
    returns once this rank has mapped every rank's segment; after a barrier all have, so each rank
    removes its segment's name: the memory stays mapped until the processes exit and is freed then,
    also after a crash or a kill."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu" or not hasattr(os, "getuid"):
        return  # the shm all-reduce is the CPU accelerator's; the same answer on every rank
    torch.distributed.barrier()
    shm_buffer_path(torch.distributed.get_rank()).unlink(missing_ok=True)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at optimizer step s (0-based), as transformers' get_scheduler (what
    Trainer, so TRL, runs): warm-up s / warmup from 0 at step 0, then cosine or linear to 0 at `total`; "constant"
    has no warm-up. Written here (tests/test_strategy.py holds it to get_scheduler at every step): importing
    transformers.optimization costs ~60 MB."""
    def f(s: int) -> float:
        if kind == "constant":
            return 1.0
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        return max(0.0, (total - s) / max(1, total - warmup))  # linear
    return f


def schedule(optimizer, o: OptimArgs, total: int):
    """The learning-rate schedule of `o` over `total` optimizer steps (its warm-up: training.config.warmup_steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.lr_scheduler_type, warmup_steps(o, total), total))


# transformers' Trainer.get_decay_parameter_names (5.23), its name patterns: importing Trainer itself costs ~90 MB
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decayed_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters weight decay applies to, by transformers' Trainer rule (so TRL's): not biases, not norm
    layers' weights (Vision-LLM-Alignment also exempts bias and LayerNorm.weight)."""
    from transformers.trainer_pt_utils import get_parameter_names
    return set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (DeepSpeed's checkpoint loading asks for weights_only=False) unpickles
    tensors and plain containers only, plus the few DeepSpeed classes its checkpoints hold: a checkpoint
    folder from elsewhere cannot run code on --resume."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    real = torch.load

    def load(*args, **kwargs):
        return real(*args, **{**kwargs, "weights_only": True})
    torch.load = load
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = real


BUCKET_DEFAULT = 500_000_000  # DeepSpeed's ZeRO reduce / allgather bucket, in elements
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs


RUN_RECORD = "run.json"  # in each resumable checkpoint: the run's shape and options, readable without loading it


def saved_run_record(ckpt_root: str | Path) -> dict | None:
    """The shape and options the newest resumable checkpoint under ckpt_root was written with (None: none, or one
    written before they were recorded)."""
    latest = Path(ckpt_root) / "latest"
    if not latest.is_file():
        return None
    record = Path(ckpt_root) / latest.read_text().strip() / RUN_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


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


class NonFiniteError(FloatingPointError):
    """A NaN or inf in a loss, reward or the weights: the run stops without writing a checkpoint."""


class Strategy:
    def __init__(self, ds: DeepSpeedArgs, optim: OptimArgs, precision: str = "fp32"):
        setup_environment()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        supported = {"fp16": get_accelerator().is_fp16_supported, "bf16": get_accelerator().is_bf16_supported}
        if precision in supported and not supported[precision]():
            raise SystemExit(f"--precision {precision}: DeepSpeed's {get_accelerator().device_name()} accelerator does "
                             "not support it here; use " + ("--precision bf16 or fp32" if precision == "fp16"
                                                              else "--precision fp32"))
        from training.model.builder import native_bf16
        if precision == "bf16" and get_accelerator().device_name() == "cuda" and not native_bf16():
            print(f"warning: --precision bf16 on a GPU of compute capability {torch.cuda.get_device_capability()} "
                  "is emulated (slow; bf16 needs 8.0, Ampere, to run natively): --precision fp16 (at --zero_stage 1-3) "
                  "is the fast choice there", file=sys.stderr)
        self.ds, self.optim, self.precision = ds, optim, precision
        self._swap_folder_taken = False  # by a trained engine's NVMe offload (_claim_swap_folder)
        self.user_config = self._user_config()
        if precision == "fp16" and ds.zero_stage == 0:
            # DeepSpeed (0.19.8) scales the loss only for a ZeRO optimizer; at stage 0 its FP16 optimizer still
            # divides the gradients by the loss scale in step(): updates 65536x too small, clipping and overflow
            # checks on unscaled gradients, while the logs show a healthy loss scale (DeepSpeed PR #8393)
            raise SystemExit("--precision fp16 at --zero_stage 0: DeepSpeed does not scale the loss there but unscales "
                             "the gradients, so the model barely trains; use --zero_stage 1 (the same memory on one "
                             "GPU), 2 or 3, or --precision bf16 / fp32")
        if ds.offload and ds.zero_stage == 0:  # CPU Adam would then get the parameters where they train (a GPU)
            raise SystemExit("--offload moves ZeRO's optimizer state (at stage 3 the parameters too) to the CPU: it "
                             "needs --zero_stage 1, 2 or 3")
        offloaded = ds.offload or offloads_optimizer(self.user_config.get("zero_optimization", {}))
        if offloaded and optim.optimizer != "adamw":
            raise SystemExit(f"an optimizer offloaded (--offload, or the config's offload_optimizer) trains with "
                             f"DeepSpeed's CPU Adam: drop --optimizer {optim.optimizer}")
        if not torch.distributed.is_initialized():
            if "RANK" not in os.environ:  # plain `python -m`: a world of one
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 1000)))
            # each rank on its own device before anything is placed (bitsandbytes loads a 4-bit model onto the
            # current device: without this every rank's went to GPU 0)
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
            deepspeed.init_distributed(dist_backend=self._backend(), verbose=False)
            if sys.excepthook is not _note_crash:
                sys.excepthook = _note_crash
            atexit.register(close_distributed)
            release_shm_names()
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    def _user_config(self) -> dict:
        """--deepspeed_config: its settings win over ours where it sets them; a ZeRO stage there becomes
        the run's (the stages' code depends on it); a conflict with a flag is an error, not a silent pick."""
        d = self.ds
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
            if any(enabled) and self.precision != kind or enabled and not any(enabled) and self.precision == kind:
                raise SystemExit(f"{d.deepspeed_config} {'enables' if any(enabled) else 'disables'} {kind}, but "
                                 f"--precision is {self.precision}: make them agree")
        for k, v in ((k, cfg.get(k) or {}) for k in ("optimizer", "scheduler")):  # (else an AttributeError below)
            if not isinstance(v, dict) or not isinstance(v.get("params") or {}, dict):
                raise SystemExit(f"{d.deepspeed_config}: {k} {v!r:.60}: give an object, its params an object")
        o = self.optim
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

    @staticmethod
    def _backend() -> str:
        from deepspeed.accelerator import get_accelerator
        return get_accelerator().communication_backend_name()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def config(self, n_trainable: int | None = None) -> dict:
        """n_trainable: the trained parameters' count. ZeRO 1-2 then reduce and gather in buckets no larger than
        those (DeepSpeed's default, 5e8 elements, is a 1 GB fp16 buffer per device even for LoRA's few weights)."""
        o, d = self.optim, self.ds
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
        user = self.user_config
        cfg = {
            "train_micro_batch_size_per_gpu": o.per_device_train_batch_size,
            "gradient_accumulation_steps": o.gradient_accumulation_steps,
            "train_batch_size": o.per_device_train_batch_size * o.gradient_accumulation_steps * self.world_size,
            "gradient_clipping": user.get("gradient_clipping", o.max_grad_norm),
            "zero_optimization": {**zero, **user.get("zero_optimization", {})},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        cfg = {**user, **cfg}  # the user's other settings (communication, activation checkpointing, ...)
        if self.precision == "bf16":  # DeepSpeed reads "bfloat16" (the old name) only without a "bf16" section
            cfg["bf16"] = {"enabled": True, **cfg.pop("bfloat16", {}), **user.get("bf16", {})}
        elif self.precision == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, **user.get("fp16", {})}
        return cfg

    def build_config(self, frozen: bool = False) -> dict | None:
        """At ZeRO-3, the config a model is built under (`load_model_and_processor(..., zero3=)`): transformers
        then creates and loads it inside deepspeed.zero.Init, each device holding only its share of the weights (rank
        0 reads the whole checkpoint into host memory, the others its headers). Built whole, every rank held the
        whole model in host memory and DeepSpeed moved all of it onto every device before partitioning it, so a
        model larger than one GPU could not train at all. None at stages 0-2."""
        if self.ds.zero_stage != 3:
            return None
        return self.frozen_config() if frozen else self.config()

    def prepare(self, model: torch.nn.Module, total_steps: int, learning_rate: float | None = None):
        """Wrap a model for training: AdamW over trainable params + warm-up/decay schedule."""
        import dataclasses

        import deepspeed

        o = self.optim if learning_rate is None else dataclasses.replace(self.optim, learning_rate=learning_rate)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if not params:
            raise ValueError("no trainable parameters: check the freeze / LoRA options")
        decayed = decayed_parameter_names(model)
        groups = [g for g in ({"params": [p for n, p in named if n in decayed], "weight_decay": o.weight_decay},
                              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0})
                  if g["params"]]
        config = self.config(sum(p.numel() for p in params))
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=o.learning_rate)
        elif offloads_optimizer(config["zero_optimization"]):  # --offload's, or the user config's (CPU or NVMe)
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            opt = DeepSpeedCPUAdam(groups, lr=o.learning_rate)
        else:
            # fused (one kernel over all parameters, as transformers' Trainer and so TRL default to) where
            # torch has it; its per-parameter loop otherwise
            fused = all(p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES for p in params)
            opt = torch.optim.AdamW(groups, lr=o.learning_rate, fused=fused or None)
        sched = schedule(opt, o, total_steps)
        self._claim_swap_folder(config)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
        return engine

    def _claim_swap_folder(self, config: dict) -> None:
        """A user's NVMe offload serves one trained model per run: DeepSpeed clears the swap folder as an engine
        starts, so PPO's critic would delete the actor's swapped-out weights and optimizer state."""
        zero = config["zero_optimization"]
        nvme = [k for k in ("offload_param", "offload_optimizer") if (zero.get(k) or {}).get("device") == "nvme"]
        if nvme and self._swap_folder_taken:
            raise SystemExit(f"{self.ds.deepspeed_config}: NVMe offload ({', '.join(nvme)}) serves one trained model "
                             "per run, and this stage trains a second (PPO's critic), whose engine would clear the "
                             "first one's swap folder: offload to the CPU (--offload) instead")
        self._swap_folder_taken = self._swap_folder_taken or bool(nvme)

    def prepare_frozen(self, model: torch.nn.Module):
        """Wrap a frozen model (reference / reward model) for inference; ZeRO-3 partitions it too."""
        import deepspeed

        model.requires_grad_(False)
        if self.ds.zero_stage != 3:
            return model.to(self.device).eval()
        engine, *_ = deepspeed.initialize(model=model, config=self.frozen_config())
        engine.eval()  # DeepSpeedEngine.eval() returns None
        return engine

    def frozen_config(self) -> dict:
        """A frozen model's ZeRO-3 config: its parameters partitioned as the trained model's (offloaded to the CPU
        with --offload or a user config's offload_param, its other zero_optimization settings applied)."""
        user = self.user_config.get("zero_optimization", {})
        # to the CPU, never to the user's NVMe folder: DeepSpeed clears an engine's swap folder as it starts, and
        # the frozen engines would share it
        offload = self.ds.offload or "offload_param" in user
        zero = {"stage": 3, **({"offload_param": {"device": "cpu"}} if offload else {})}
        # the run's bf16 / fp16 section: zero.Init builds the partitions in the dtype it names (fp32 without one,
        # which doubled a bf16 reference's memory and made it compute in another precision than the policy)
        precision = {k: v for k, v in self.config().items() if k in ("bf16", "fp16")}
        return {"train_micro_batch_size_per_gpu": 1, **precision, "zero_optimization": {
            **zero, **{k: v for k, v in user.items() if k not in ("offload_optimizer", "offload_param")}}}

    # ---- reductions --------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor | float, op: str = "sum") -> torch.Tensor:
        """Sum (or op) over ranks, float64, on the CPU; reduced on the rank's device (NCCL takes no CPU
        tensors)."""
        t = torch.as_tensor(x, dtype=torch.float64).detach().clone()
        if self.world_size > 1:
            t = t.to(self.device)
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return t.cpu()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a same-shaped tensor from every rank along dim 0 (detached, on CPU)."""
        x = x.detach().float().to(self.device)
        if self.world_size == 1:
            return x.cpu()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, x)
        return torch.cat(out).cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # ---- saving ------------------------------------------------------------------------------
    def write_report(self, report, out_dir: str | Path) -> None:
        """The bad-row report of all ranks (each encodes its own rows), written by the main rank; joined with
        the one already in out_dir, which only this run wrote (a fresh run removes an earlier run's): a run
        stopped early writes what it found, and the resumed run, which does not encode those rows again,
        adds to it."""
        parts = [(report.skipped, report.cut)]
        if self.world_size > 1:
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, (report.skipped, report.cut))
        if self.is_main:
            earlier = Path(out_dir) / "bad_rows.json"
            if earlier.is_file():
                old = json.loads(earlier.read_text())
                parts.append((old.get("rows", []), old.get("truncated_rows", [])))
            report.merge(parts)
            report.write(out_dir)

    def weights_finite(self, engine) -> bool:
        """Whether every rank's trained parameters (its partitions under ZeRO-3) are free of NaN and inf (collective).
        Frozen ones are left out (no step changes them: a LoRA run's whole base was read every PPO step), and the
        flags are gathered on the device and read once (reading one per parameter waited on a GPU each time)."""
        module = engine.module if hasattr(engine, "module") else engine
        flags = [torch.isfinite(_held_values(p, self.rank)).all() for p in module.parameters() if p.requires_grad]
        bad = float((~torch.stack([f.to(flags[0].device) for f in flags])).sum()) if flags else 0.0
        return float(self.all_reduce(bad)) == 0

    def require_finite_weights(self, engine, where: Path) -> None:
        """Stop, on every rank, before writing `where` when any rank's weights hold a NaN or inf: an optimizer
        step can make them so from a finite loss (an overflowing gradient), and the last good checkpoint must
        stay the last one written."""
        if not self.weights_finite(engine):
            raise NonFiniteError(f"non-finite weights: {where} was not written; the last good checkpoint is "
                                 "intact (resume with --resume after fixing the cause, e.g. a lower learning rate)")

    @contextlib.contextmanager
    def whole_for_generation(self, engine, gather: bool = True):
        """The engine's module for generation. At ZeRO-3 with `gather`: every weight gathered on this rank and
        ZeRO's per-module hooks off for the duration (as DeepSpeed's unwrap_model_for_generation and TRL's
        ds3_gather_for_generation do; theirs leave the hooks off after an error), so generating costs one
        all-gather of the model instead of one per layer per generated token, and ranks need not keep step with
        each other (no synced_gpus); the whole model must fit in one device's memory beside the run. Otherwise
        the module as it is."""
        module = engine.module if hasattr(engine, "module") else engine
        if self.ds.zero_stage != 3 or not gather:
            yield module
            return
        import deepspeed

        hooks = engine.optimizer.parameter_offload  # DeepSpeedZeRoOffload: the hooks that fetch and release weights
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for h in hooks.forward_hooks + hooks.backward_hooks:
                h.remove()
            hooks.forward_hooks, hooks.backward_hooks = [], []
            try:
                yield module
            finally:  # back (their trace re-recorded) before the weights are partitioned again, also after an error
                hooks._register_deepspeed_module(module)

    def save_hf(self, engine, processor, out_dir: str | Path) -> None:
        """Save a Hugging Face checkpoint (safetensors); under ZeRO-3 the parameters are gathered first."""
        from training.model.builder import save_model

        out_dir = Path(out_dir)
        self.require_finite_weights(engine, out_dir)
        module = engine.module if hasattr(engine, "module") else engine
        if self.ds.zero_stage == 3 and not _adapters(module):
            # collective: the weights gathered one module at a time into rank 0's CPU memory, which writes them
            # (gathering them all at once held the whole model on every device, beside the optimizer's state)
            state = engine._zero3_consolidated_16bit_state_dict()
            if self.is_main:
                save_model(module, processor, out_dir, state_dict=state)
        elif self.ds.zero_stage == 3:  # adapters: only trained weights are written (peft's adapters, the trained
            # projector / tower / value head), so only they are gathered (all of them held the whole model on every
            # device at the last step of a run that was partitioned because it does not fit one)
            import deepspeed
            with deepspeed.zero.GatheredParameters([p for p in module.parameters() if p.requires_grad],
                                                   modifier_rank=None):
                if self.is_main:
                    save_model(module, processor, out_dir)
        elif self.is_main:
            save_model(module, processor, out_dir)
        self.barrier()

    def save_resume(self, engines: dict, step: int, client_state: dict, keep: int) -> None:
        """Write a resumable checkpoint `step<step>` of every engine ({checkpoint dir: engine}, e.g. PPO's actor
        and critic). Only when every engine is written by every rank does each dir's `latest` name it (written
        atomically); only then are older checkpoints rotated out (the newest `keep`, this one among them) and
        any of a later step removed (left by a run killed while writing them, which this run resumed before).
        DeepSpeed's own `latest` was written by rank 0 before the other ranks had finished their shards, and
        rotation per engine could leave PPO's actor and critic with no step in common."""
        tag = f"step{step}"
        for root, engine in engines.items():
            self.require_finite_weights(engine, Path(root) / tag)
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=_adapters(engine))
        if hasattr(os, "sync"):  # every rank's shards on disk before `latest` names them (a power loss, a crash)
            os.sync()
        self.barrier()
        if self.is_main:
            for root in engines:  # what a resume checks before DeepSpeed loads (it fails obscurely on another stage)
                write_text_atomic(Path(root) / tag / RUN_RECORD, json.dumps(
                    {k: client_state[k] for k in ("shape", "settings") if k in client_state}))
            for root in engines:
                write_text_atomic(Path(root) / "latest", tag)
            for root in engines:
                rotate_checkpoints(Path(root), step, keep)
        self.barrier()

    def load_resume(self, engine, ckpt_root: str | Path) -> dict | None:
        """Load the newest resumable checkpoint (written by this project's own runs) if any. A LoRA / QLoRA
        model's checkpoints hold its trained weights only (adapters and whatever else trains): its frozen base is
        the one it was built on (--from_checkpoint), as with peft's own checkpoints; a 4-bit base's quantisation
        state cannot even be loaded back into a module."""
        ckpt_root = Path(ckpt_root)
        if not (ckpt_root / "latest").exists():
            return None
        tag = (ckpt_root / "latest").read_text().strip()
        dangling = SystemExit(f"--resume: {ckpt_root / 'latest'} names checkpoint {tag!r}, which cannot be loaded "
                              f"from {ckpt_root}; point `latest` at a checkpoint folder that is there, or run without "
                              "--resume to start afresh")
        if not (ckpt_root / tag).is_dir():  # DeepSpeed would assert, or return nothing (a fresh start, which
            raise dangling                   # deletes the checkpoints that are there)
        with weights_only_loads():
            path, client_state = engine.load_checkpoint(str(ckpt_root), load_optimizer_states=True,
                                                        load_lr_scheduler_states=True,
                                                        custom_load_fn=_load_trained if _adapters(engine) else None)
        if path is None:
            raise dangling
        return client_state


def _held_values(p: torch.Tensor, rank: int) -> torch.Tensor:
    """The values of parameter p this rank holds: under ZeRO-3 its partition without the padding that fills the last
    ranks' shares up to the partition size (DeepSpeed allocates it with torch.empty and never writes it: any bits,
    NaN included, which stopped runs at random, e.g. on mllama's one-element gates); else p itself."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p
    group = getattr(p, "ds_process_group", None)
    if group is not None and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank(group=group)
    n = part.numel()
    return part.reshape(-1)[:max(0, min(n, p.ds_numel - rank * n))]


def _adapters(engine) -> bool:
    """Whether the engine trains a peft (LoRA / QLoRA) model, or one inside (a reward model's or critic's backbone)."""
    return any(hasattr(m, "peft_config") for m in getattr(engine, "module", engine).modules())


def _load_trained(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module loading for a checkpoint of trained weights only (training.engine.strategy.save_resume):
    every trained parameter of `dst` must be in `src`."""
    trained = [n for n, p in dst.named_parameters() if p.requires_grad]
    missing = [n for n in trained if n not in src]
    if missing:
        raise SystemExit(f"--resume: the checkpoint lacks {len(missing)} trained weights of this model (such as "
                         f"{missing[0]}): it was written for another model or LoRA setting; start afresh without "
                         "--resume")
    dst.load_state_dict({n: src[n] for n in trained}, strict=False)
