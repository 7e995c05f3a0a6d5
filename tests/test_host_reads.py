"""A training step reads its numbers to the host once, after its last micro-batch: each read of a GPU tensor
(float(), .item(), .tolist(), .cpu(), ...) makes the CPU wait for the GPU, and one per micro-batch left the GPU
idle between micro-batches while the CPU launched the next. Reads made by our code (training/) are recorded
between the step's first and last backward; transformers' own (inside a model's forward) are not ours to move, nor
is training.logprobs' nonzero() (the loss takes the target positions only, which a dense log-softmax over every
position and the whole vocabulary would cost far more than the wait). A .to(device) is not watched: on this CPU-only
machine a copy to the host and one to the training device are the same call."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def reads_between_backwards(monkeypatch):
    """-> the list of (caller file:line, method) of host reads by training/ code after a step's first backward and
    before its last, filled as the stages run."""
    import deepspeed
    events, found = [], []
    ours = str(ROOT / "training")

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(ours):
                events.append(("read", f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno} {name}"))
            return real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)
    for name in READS:
        wrap(name)
    real_backward, real_step = deepspeed.DeepSpeedEngine.backward, deepspeed.DeepSpeedEngine.step

    def backward(self, *a, **k):
        events.append(("backward", ""))
        return real_backward(self, *a, **k)

    def step(self, *a, **k):
        boundary = self.is_gradient_accumulation_boundary()  # of this micro-step: step() moves on to the next
        out = real_step(self, *a, **k)
        if boundary:
            events.append(("boundary", ""))
        return out
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "backward", backward)
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "step", step)

    def collect():
        step_events = []
        for kind, what in events:
            step_events.append((kind, what))
            if kind == "boundary":
                backs = [i for i, (k, _) in enumerate(step_events) if k == "backward"]
                if len(backs) > 1:
                    found.extend(w for k, w in step_events[backs[0]:backs[-1]] if k == "read")
                step_events = []
        events.clear()
        return found
    return collect


def test_sft_rm_and_dpo_read_once_per_step(world, tiny, tmp_path, reads_between_backwards):
    from sft_helpers import sft_args

    from training.dpo.main import main as dpo_main
    from training.rm.main import main as rm_main
    from training.sft.main import main as sft_main
    accum = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--max_steps", "2"]
    sft_main(sft_args(world, tiny, tmp_path / "sft", *accum))
    assert not (r := reads_between_backwards()), f"SFT: {r}"
    rm_main(["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"), "--image_folder",
             str(world / "images"), "--output_dir", str(tmp_path / "rm"), "--no-progress", "--figure_dir",
             str(tmp_path / "rm" / "figure"), *accum])
    assert not (r := reads_between_backwards()), f"RM: {r}"
    for loss in ("sigmoid", "orpo"):
        dpo_main(["--from_checkpoint", str(tiny), "--data_path", str(world / "preference_train.json"),
                  "--image_folder", str(world / "images"), "--output_dir", str(tmp_path / loss), "--no-progress",
                  "--figure_dir", str(tmp_path / loss / "figure"), "--loss_type", loss, *accum])
        assert not (r := reads_between_backwards()), f"{loss}: {r}"
