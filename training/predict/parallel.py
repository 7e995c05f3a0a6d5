"""N processes answering one question file, one per GPU: each answers every N-th question (training.predict.main's
--num_chunks / --chunk_idx) into the one answers file. `NUM_GPUS=N bash run_predict.sh ...` and eval.benchmark's
--num_processes start them here.

    python -m training.predict.parallel N <training.predict.main flags>

Process i sees the i-th of the first N GPUs (CUDA_VISIBLE_DEVICES's when it is set) as its only one; on a CPU-only
machine (or DS_ACCELERATOR=cpu) the N processes share the cores (OMP_NUM_THREADS = cores / N each). Ctrl-C (or a
termination signal) stops every process; the exit status is the first failing process's, else 0.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def process_devices(n: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of n processes (None each on the CPU). Stops when there are fewer GPUs than n."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return [None] * n
    import torch
    count = torch.cuda.device_count()
    if count == 0:
        return [None] * n
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count)))).split(",") if d]
    if min(count, len(visible)) < n:
        raise SystemExit(f"{n} processes, one per GPU, but {min(count, len(visible))} GPUs are there to use ({count} "
                         f"seen, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return visible[:n]


def cpu_threads(n: int) -> str:
    """OMP_NUM_THREADS of each of n processes sharing the CPU: the cores this process may run on (its affinity, as
    `nproc` and scripts/env.sh count them: a SLURM job's or taskset's share, not every core of the machine), shared."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return str(max(1, usable // n))


def check_device(device: str, n: int) -> None:
    """n processes each answer on a GPU of their own (CUDA_VISIBLE_DEVICES one each): a device with an index would
    name a GPU the process cannot see."""
    if n > 1 and ":" in (device or ""):
        raise SystemExit(f"--device {device} with {n} processes: each process answers on a GPU of its own; pass the "
                         "device kind (cuda) or choose the GPUs with CUDA_VISIBLE_DEVICES")


def _device_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return ""


def _on_term(*_):
    raise SystemExit(143)  # the clean-up in run_chunks runs


def run_chunks(argv: list[str], n: int) -> int:
    """training.predict.main with argv in n processes (chunk i of n each); returns the exit status (a process killed
    by a signal gives 128 + its number, as a shell says it). A termination signal stops them all: the handler is
    set here, for every caller (eval.benchmark's too), and put back after."""
    check_device(_device_arg(argv), n)  # before any process starts (each failed alone on a device it cannot see)
    procs = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_term) if main_thread else None
    try:
        for i, device in enumerate(process_devices(n)):
            env = dict(os.environ)
            if device is None:
                env["OMP_NUM_THREADS"] = cpu_threads(n)
            else:
                env["CUDA_VISIBLE_DEVICES"] = device
            procs.append(subprocess.Popen([sys.executable, "-m", "training.predict.main", *argv, "--num_chunks",
                                           str(n), "--chunk_idx", str(i)], env=env))
        status = 0
        for p in procs:
            rc = p.wait()
            status = status or (128 - rc if rc < 0 else rc)
        return status
    finally:  # Ctrl-C, a termination signal, an error starting one: none of them keeps running
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        raise SystemExit("usage: python -m training.predict.parallel N <training.predict.main flags>")
    try:
        sys.exit(run_chunks(sys.argv[2:], int(sys.argv[1])))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
