"""Shared fixtures for stage tests: a small embedded world and the tiny VLM, built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.engine.distributed import free_port  # noqa: F401  (the tests' two-rank launches take one too)
from training.model.tiny import ensure_tiny_vlm
from training.world.generate import WorldConfig, generate

SMALL_WORLD = WorldConfig(seed=7, n_sft=24, n_pref=16, n_ppo=8, n_heldout=8)


def make_world(root: Path) -> Path:
    if not (root / "world.json").exists():
        generate(root, SMALL_WORLD)
    return root


def make_tiny(root: Path) -> Path:
    return ensure_tiny_vlm(root, hidden=32, layers=1, vision_pretrain_steps=0)


def sft_args(world: Path, tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["--from_checkpoint", str(tiny), "--data_path", str(world / "sft_train.json"),
            "--image_folder", str(world / "images"), "--output_dir", str(out), "--no-progress",
            "--logging_steps", "1", "--num_warmup_steps", "0", "--lr_scheduler_type", "constant",
            "--figure_dir", str(out / "figure"), *extra]


def weights(out: Path) -> dict:
    return load_file(str(Path(out) / "model.safetensors"))


def assert_same_grads(got, want) -> None:
    """Two torch.autograd.grad results (allow_unused) agree: the same parameters reached, the same gradients."""
    n = 0
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            n += 1
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert n > 10


def make_reward_model(tiny: Path, out: Path, factual: bool = True, seed: int = 0) -> Path:
    """An untrained reward model on the tiny VLM (random head): enough to drive PPO plumbing."""
    import torch

    from training.config import LoraArgs, ModelArgs
    from training.model.builder import load_model_and_processor, save_model
    from training.rm.model import RewardModel

    if not (out / "reward_model.json").exists():
        torch.manual_seed(seed)
        backbone, processor, _ = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs())
        save_model(RewardModel(backbone, factual=factual), processor, out)
    return out


def ppo_args(world: Path, tiny: Path, rm: Path, out: Path, *extra: str) -> list[str]:
    return ["--from_checkpoint", str(tiny), "--reward_model", str(rm), "--data_path", str(world / "ppo_prompts.json"),
            "--image_folder", str(world / "images"), "--output_dir", str(out), "--no-progress",
            "--rollout_batch_size", "4", "--per_device_train_batch_size", "2", "--max_new_tokens", "8",
            "--logging_steps", "1", "--figure_dir", str(out / "figure"), *extra]


def ppo_args_with_prompts(rows: list[dict], path: Path, world: Path, tiny: Path, rm: Path, out: Path,
                          *extra: str) -> list[str]:
    """ppo_args reading other prompt rows, written to `path` as a JSON list."""
    import json
    path.write_text(json.dumps(rows))
    args = ppo_args(world, tiny, rm, out, *extra)
    args[args.index("--data_path") + 1] = str(path)
    return args


def on_reference_logprobs(monkeypatch, change) -> None:
    """Routes the log-probs a PPOTrainer computes for its reference (inside its _ref_context) through
    change(trainer, (log-probs, mask, entropy), batch, suppressed) -> what the trainer gets instead."""
    import contextlib

    from training.ppo.trainer import PPOTrainer
    real_ctx, real_lp = PPOTrainer._ref_context, PPOTrainer._logprobs

    @contextlib.contextmanager
    def ctx(self):
        with real_ctx(self):
            self._in_ref = True
            yield
        self._in_ref = False

    def logprobs(self, model, batch, suppressed, with_entropy=False):
        out = real_lp(self, model, batch, suppressed, with_entropy)
        return change(self, out, batch, suppressed) if getattr(self, "_in_ref", False) else out

    monkeypatch.setattr(PPOTrainer, "_ref_context", ctx)
    monkeypatch.setattr(PPOTrainer, "_logprobs", logprobs)


class FakeRank:
    """A stand-in strategy: one rank of `world`, all_reduce recording what it is given."""

    def __init__(self, rank, world):
        self.rank, self.world_size, self.device, self.seen = rank, world, "cpu", []

    def all_reduce(self, x):
        t = torch.as_tensor(x, dtype=torch.float64).clone()
        self.seen.append(float(t) if t.numel() == 1 else t)
        return t


def pref_dataset(world, tiny, max_len, report=None, n_responses=0):
    from training.config import LoraArgs, ModelArgs
    from training.data.bad_rows import BadRowReport
    from training.data.formats import read_preferences
    from training.dpo.data import PreferenceDataset
    from training.model.builder import load_model_and_processor
    from training.templates.chat import ChatEncoder

    _, proc, arch = load_model_and_processor(ModelArgs(from_checkpoint=str(tiny)), LoraArgs(), for_training=False)
    recs = read_preferences([str(world / "ranked_train.json")], str(world / "images"))
    return PreferenceDataset(recs, ChatEncoder(proc, arch, max_len), str(world / "images"), report or BadRowReport(),
                             n_responses)


def hub_revision(hub: Path, repo_id: str, commit: str, content: str = "") -> None:
    """A revision of a Hub model in a local Hugging Face cache folder `hub`, as huggingface_hub lays it out: its
    config.json a link to a blob named by its content (default: the commit), refs/main naming the commit."""
    repo, content = hub / f"models--{repo_id.replace('/', '--')}", content or commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / content).write_text(content)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").symlink_to(repo / "blobs" / content)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def split_rows(source: Path, folder: Path, *cuts: tuple[int, int]) -> list[Path]:
    """Files a.json, b.json, ... in `folder`, each holding the rows source[start:end] of one cut."""
    import json
    rows = json.loads(source.read_text())
    out = [folder / f"{chr(ord('a') + k)}.json" for k in range(len(cuts))]
    for path, (start, end) in zip(out, cuts):
        path.write_text(json.dumps(rows[start:end]))
    return out


def tb_scalars(out: Path) -> dict:
    """{tag: [(step, value), ...]} of the scalars in out/tensorboard (an event file alone holds none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_two_ranks(driver: str, *args, timeout: int = 600) -> int:
    """tests/<driver> on two CPU ranks through the deepspeed launcher (one thread each); asserts it exits 0 and returns
    its master port."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
           str(root / "tests" / driver), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return port
