"""DeepSpeed, wrapped once: distributed setup, config, engine, backward/step, save and resume.

Every stage goes through this object; nothing else imports deepspeed but the modules it is built on: `distributed`
(the process group), `ds_config` (the DeepSpeed config), `optimizer` (the optimizer and its schedule) and
`checkpoints` (checkpoint files). On a machine without a GPU DS_ACCELERATOR=cpu is set (run_*.sh does it too) and
ranks talk over gloo.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from training.config import DeepSpeedArgs, OptimArgs
from training.engine.checkpoints import RUN_RECORD, _adapters, _load_trained, rotate_checkpoints, weights_only_loads
from training.engine.distributed import setup_environment, start_distributed
from training.engine.ds_config import engine_config, frozen_engine_config, offloads_optimizer, read_user_config
from training.engine.optimizer import build_optimizer, schedule
from training.files import write_text_atomic


class NonFiniteError(FloatingPointError):
    """A NaN or inf in a loss, reward or the weights: the run stops without writing a checkpoint."""


class Strategy:
    def __init__(self, ds: DeepSpeedArgs, optim: OptimArgs, precision: str = "fp32"):
        setup_environment()
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
        self.user_config = read_user_config(ds, optim, precision)
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
        start_distributed()
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def config(self, n_trainable: int | None = None) -> dict:
        """The trained model's DeepSpeed config (`ds_config.engine_config`; n_trainable: its trained parameters'
        count)."""
        return engine_config(self.ds, self.optim, self.precision, self.user_config, self.world_size, n_trainable)

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
        config = self.config(sum(p.numel() for p in params))
        opt = build_optimizer(model, named, o, offloads_optimizer(config["zero_optimization"]))
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
        """A frozen model's ZeRO-3 config (`ds_config.frozen_engine_config`)."""
        return frozen_engine_config(self.ds, self.user_config, self.config())

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
