"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers are not fresh pages each step.

XLA:CPU allocates an executable's temporary buffers as one block per execution (136 MB for a d64 ladder
step: activations, gradients, attention probabilities) and frees it when the step ends. glibc's malloc
hands out such a block with a fresh mmap (every block above 32 MB, and any block that a thread's own
arena cannot hold), so every step begins by page-faulting the whole block in and zeroing it: measured on
the d64 ladder step, 33,000 page faults and 70 ms of kernel time per 100 ms step. With no mmap and no
trimming, the block is reused from the heap; PyTorch's smaller per-op buffers never hit this. The
number of arenas stays glibc's: a single arena serialises XLA's compiler threads on one lock, which made
compile-heavy work (the test suite) a quarter slower and the ladder's runs no faster (docs/performance.md).

`retain_freed_memory()` must run before JAX starts its CPU client (its threads bind to malloc arenas
then); the command-line entry points call it first. `CGPT_HOST_MALLOC=default` leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of unmapping it; True when applied."""
    if os.environ.get("CGPT_HOST_MALLOC", "retain") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    # Never mmap (a block a thread arena cannot hold then comes from the main heap) and never return the
    # top of the heap to the OS. Each call returns 1 on success.
    return all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
