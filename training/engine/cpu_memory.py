"""CPU runs: freed tensor memory stays in the process for the next batch instead of going back to the OS.

On the CPU, PyTorch allocates tensors with the C library's malloc. glibc serves every block above its
mmap threshold (128 KB at start, raised only as mmapped blocks are freed) with a fresh mmap and gives
it back with munmap when it is freed, so a loop that allocates and frees the same activation sizes
batch after batch faults the pages of each one in anew every time. Measured with
`python -m benchmarks.dpo_speed --only ours` (2-core CPU, 64 pairs, 8 batches; each invocation 3 runs,
median), twice with this setting and twice with it off (`GLIBC_TUNABLES=`): the no-grad reference pass
took 0.51 and 0.54 s with it, 0.62 and 0.65 s without; the training steps 1.24 and 1.34 s vs 1.48 and 1.27 s.
`keep_freed_memory` sets glibc's mmap threshold to its maximum (32 MB on 64-bit) and turns trimming
off: blocks up to that size come from the heap, and freed ones are reused. The price is that the
process keeps its high-water heap until it exits. Nothing is done when the C library is not glibc or
when the user set malloc options of their own (MALLOC_* or GLIBC_TUNABLES in the environment; an empty
`GLIBC_TUNABLES=` turns the setting off and changes nothing else).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # glibc's ceiling for it on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_OFF = 2 ** 31 - 1  # trim only above 2 GB of free heap top: in practice never


def keep_freed_memory() -> bool:
    """Apply the settings above; -> whether they were applied (idempotent)."""
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's name; musl and macOS have no mallopt here
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_OFF))
