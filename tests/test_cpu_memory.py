"""CPU runs keep freed tensor memory for reuse (training.engine.cpu_memory): a tensor allocated again
after being freed no longer faults its pages in anew."""
import os
import subprocess
import sys


PROBE = r"""
import ctypes, os, resource, sys, torch
from training.engine.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
big = torch.empty(30 * 2 ** 18)  # 30 MB, the process's first large block: heap (below the break) or its own mmap?
in_heap = None
if os.confstr("CS_GNU_LIBC_VERSION"):  # glibc: sbrk(0) is the heap's end
    libc = ctypes.CDLL("libc.so.6")
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    in_heap = big.data_ptr() < libc.sbrk(0)
del big
sizes = [3 * 2 ** 20, 2 ** 19, 2 ** 21, 2 ** 18, 3 * 2 ** 19, 2 ** 20] * 4  # float32 blocks of 1-12 MB, 132 MB
def cycle():  # like a no-grad forward: activations allocated, then all freed
    xs = []
    for n in sizes:
        xs.append(torch.empty(n).fill_(1.0))
    del xs
for _ in range(3):
    cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(applied, in_heap, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 5)
"""


def probe(mode: str, **env) -> tuple[str, str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    return out[0], out[1], int(out[2])


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


def test_freed_blocks_are_reused_without_page_faults():
    applied, in_heap, faults = probe("keep")
    if not _glibc():  # nothing to set: the function says so and leaves malloc alone
        assert applied == "False"
        return
    pages = sum([3 * 2 ** 20, 2 ** 19, 2 ** 21, 2 ** 18, 3 * 2 ** 19, 2 ** 20] * 4) * 4 // 4096
    assert applied == "True" and in_heap == "True"  # blocks up to 32 MB come from the heap
    assert faults < 0.05 * pages  # and freed ones are reused: their pages are already there
    # glibc's defaults: a fresh process's 30 MB block gets an mmap of its own, unmapped again when freed (how
    # many pages later cycles fault in again depends on the heap's layout: not asserted)
    _, in_heap, _ = probe("default")
    assert in_heap == "False"


def test_the_users_own_malloc_settings_win():
    applied, in_heap, _ = probe("keep", MALLOC_ARENA_MAX="2")
    assert applied == "False" and in_heap in ("False", "None")
