"""y = x · dequantize(W) on XLA:CPU through a C++ kernel (`quantized_matmul.cc`) that reads the weight once
as int8 or packed int4 and dequantizes it tile by tile in cache, for a weight-only quantized W
(`cgpt_jax/quantize/array.py`: int8 per output channel, int4 group-wise, float32 scales).

XLA:CPU does not fuse the dequantization into a matmul of more than one row: it writes the float32 weight
out and reads it back, so a decode step reads more bytes than in float32. The kernel is for the few rows
of a decode step; `cgpt_jax/quantize/matmul.py` decides where it runs. It is compiled on first use and
cached (`cgpt_jax/kernels/build.py`); `build()` and `load()` raise `KernelUnavailable` with the reason when
that fails, and the quantized model then runs XLA's dequantize-then-matmul instead.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cgpt_jax.kernels import build as kernel_build
from cgpt_jax.kernels.build import KernelUnavailable, compiler

__all__ = ["KernelUnavailable", "build", "compiler", "load", "matmul"]

SOURCE = pathlib.Path(__file__).with_name("quantized_matmul.cc")
TARGET = "cgpt_quantized_matmul"


def build() -> pathlib.Path:
    """The kernel's shared library for this machine: compiled on first use, then taken from the cache."""
    return kernel_build.build(SOURCE)


def load() -> pathlib.Path:
    """Build the kernel and register it with XLA:CPU, once per process; returns the library's path."""
    return kernel_build.load(SOURCE, ((TARGET, "QuantizedMatmul"),))


def matmul(x_MxK: jax.Array, q: jax.Array, scale: jax.Array, *, bits: int, transposed: bool) -> jax.Array:
    """x · dequantize(q, scale) → float32 [M, N]; call `load()` first.

    transposed=False: q [K, N] int8 (bits 8) or [K, N/2] uint8 (bits 4, two values per byte along N), scale
    [G, N]. transposed=True (a weight stored [N, K], such as the tied LM head): q [N, K] or [N, K/2], scale
    [N, G]. The K inputs split into G groups of K/G consecutive ones, each with its own scale per output."""
    packing = 2 if bits == 4 else 1
    n = q.shape[0] if transposed else q.shape[1] * packing
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x_MxK.astype(jnp.float32), q, scale, bits=np.int32(bits), transposed=np.int32(transposed))
