"""Host memory for XLA:CPU's buffers: freed memory kept in the process, and weights on huge pages.

Kept memory, so that XLA:CPU's per-step buffers are not fresh pages each step.

XLA:CPU allocates an executable's temporary buffers as one block per execution (136 MB for a d64 ladder
step: activations, gradients, attention probabilities) and frees it when the step ends. glibc's malloc
hands out such a block with a fresh mmap (every block above 32 MB, and any block that a thread's own
arena cannot hold), so every step begins by page-faulting the whole block in and zeroing it: measured on
the d64 ladder step, 33,000 page faults and 70 ms of kernel time per 100 ms step. With no mmap and no
trimming, the block is reused from the heap; PyTorch's smaller per-op buffers never hit this. The
number of arenas stays glibc's: a single arena serialises XLA's compiler threads on one lock, which made
compile-heavy work (the test suite) a quarter slower and the ladder's runs no faster (docs/performance.md).

`retain_freed_memory()` must run before JAX starts its CPU client (its threads bind to malloc arenas
then); the command-line entry points call it first.

Huge pages, so that streaming a weight reads it at the memory's speed: a decode step reads every weight
once, and on 4 KiB pages the hardware prefetcher starts over at every page, where Linux's transparent
huge pages (2 MiB) give it runs 512 times as long; XLA:CPU's buffers are plain malloc memory, which
Linux backs with huge pages only where asked when its THP mode is `madvise` (as here). `back_with_huge_pages`
asks for the buffers of the arrays given; the generator calls it on its weights (docs/performance.md).

`CGPT_HOST_MALLOC=default` leaves malloc and the pages alone.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

# mallopt parameters from glibc's <malloc.h>, madvise advice from Linux's <asm-generic/mman-common.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_HUGE_PAGE = 2 << 20


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


def back_with_huge_pages(tree: Any) -> int:
    """Ask Linux to back the host buffers of `tree`'s CPU arrays with 2 MiB pages: each whole 2 MiB-aligned
    span inside a buffer, now where the kernel can (MADV_COLLAPSE, Linux 6.1+) and otherwise when its
    khugepaged gets to it (MADV_HUGEPAGE). The arrays' values are unchanged. Returns the bytes moved onto
    huge pages now (0 where Linux cannot: no transparent huge pages, a kernel before 6.1, THP disabled for
    the process, no free 2 MiB pages)."""
    if os.environ.get("CGPT_HOST_MALLOC", "retain") == "default" or not sys.platform.startswith("linux"):
        return 0
    import jax  # here, not at the top: retain_freed_memory must be importable before JAX starts

    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    moved = 0
    arrays = {id(leaf): leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)}  # each once
    for array in jax.block_until_ready(list(arrays.values())):
        for shard in array.addressable_shards:
            size = shard.data.on_device_size_in_bytes()
            if shard.device.platform != "cpu" or size < _HUGE_PAGE:
                continue
            address = shard.data.unsafe_buffer_pointer()
            start = -(-address // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside the buffer only
            end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
            if end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0:
                moved += (end - start) if madvise(start, end - start, _MADV_COLLAPSE) == 0 else 0
    return moved
