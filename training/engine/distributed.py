"""The process group: the environment DeepSpeed runs in, joining ranks, and leaving together at exit."""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch


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


def free_port() -> int:
    """A TCP port free on this host now, for a world of one's store: 29500 + pid % 1000 before, which a run started
    beside another (or beside a service on that port) could share, failing on EADDRINUSE."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_distributed() -> None:
    """Join this process to the process group (a world of one under plain `python -m`) unless it has: its rank on its
    own device, the exit handlers in place (`close_distributed`, and `note_failed_exit` on an uncaught exception),
    DeepSpeed's /dev/shm names released."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    # each rank on its own device before anything is placed (bitsandbytes loads a 4-bit model onto the
    # current device: without this every rank's went to GPU 0)
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    if sys.excepthook is not _note_crash:
        sys.excepthook = _note_crash
    atexit.register(close_distributed)
    release_shm_names()
