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
huge pages (2 MiB) give it runs 512 times as long. XLA:CPU's buffers are plain malloc memory, which
Linux backs with huge pages only where asked when its THP mode is `madvise` (as here), and then only
the whole 2 MiB pages inside a buffer: none of a 0.6 MB int8 weight, a part of a 2.4 MB one.
`on_huge_pages` therefore copies the arrays given into one mapping of whole huge pages, back to back,
and hands them to JAX as they lie there (a host array's buffer, aliased); the generator calls it on its
weights (docs/performance.md).

`CGPT_HOST_MALLOC=default` leaves malloc and the pages alone.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import Any

import numpy as np

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


def on_huge_pages(tree: Any) -> Any:
    """`tree` with its arrays that lie on one CPU device copied, back to back (64-byte aligned), into one
    anonymous mapping of whole 2 MiB pages that Linux is asked to back with huge pages, now where it can
    (MADV_COLLAPSE, Linux 6.1+) and otherwise when its khugepaged gets to it. Values are unchanged and an
    array met twice is copied once; other leaves (sharded arrays, other devices) stay as they are, and so
    does the whole tree where Linux has no transparent huge pages or the process opted out."""
    if os.environ.get("CGPT_HOST_MALLOC", "retain") == "default" or not sys.platform.startswith("linux"):
        return tree
    import jax  # here, not at the top: retain_freed_memory must be importable before JAX starts

    leaves, treedef = jax.tree.flatten(tree)
    movable = {id(leaf): leaf for leaf in leaves if isinstance(leaf, jax.Array) and leaf.size
               and len(leaf.sharding.device_set) == 1 and leaf.is_fully_addressable
               and next(iter(leaf.sharding.device_set)).platform == "cpu"}
    offsets, total = {}, 0
    for key, array in movable.items():
        offsets[key], total = total, total + -(-array.nbytes // 64) * 64
    if not total:
        return tree
    size = -(-total // _HUGE_PAGE) * _HUGE_PAGE
    # Private (a shared mapping is shmem, which Linux backs with huge pages by another rule) and untouched.
    mapping = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(mapping, np.uint8)
    arena = raw[-raw.ctypes.data % _HUGE_PAGE:][:size]
    if _madvise(arena.ctypes.data, size, _MADV_HUGEPAGE) != 0:  # no transparent huge pages here
        return tree
    moved = {}
    for key, array in jax.block_until_ready(movable).items():
        host = np.asarray(array)
        view = arena[offsets[key]:offsets[key] + host.nbytes].view(host.dtype).reshape(host.shape)
        view[...] = host
        # On CPU the new array's buffer is the view's memory; committed as the array was (or a program
        # compiled for the array would compile again for its copy).
        copy = jax.device_put(view, array.sharding if array.committed else None)
        moved[key] = copy if copy.unsafe_buffer_pointer() == view.ctypes.data else array
    _madvise(arena.ctypes.data, size, _MADV_COLLAPSE)  # pages the faults did not make huge
    return jax.tree.unflatten(treedef, [moved.get(id(leaf), leaf) for leaf in leaves])


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise(2) → 0, or -1 (also where libc has none)."""
    try:
        madvise = ctypes.CDLL("libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return -1
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise(address, length, advice)
