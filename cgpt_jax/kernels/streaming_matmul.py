"""y = x · W on XLA:CPU for the few rows of a decode step, through a C++ kernel (`streaming_matmul.cc`) that
reads W once, as a stream, and converts it to float in registers: W float32, or weight-only quantized
(`cgpt_jax/quantize/array.py`: int8 per output channel, int4 group-wise, float32 scales).

With a few rows a matmul is as fast as its weight streams from memory. XLA:CPU's GEMM reads a float32
weight well below the machine's read bandwidth at 2–16 rows, and for a quantized weight it writes the
dequantized float32 weight out and reads it back, so a decode step read more bytes than in float32.
`cgpt_jax/model/few_rows.py` decides where the kernel runs. It is compiled on first use and cached
(`cgpt_jax/kernels/build.py`); `build()` and `load()` raise `KernelUnavailable` with the reason when that
fails, and the model then runs its matmuls through XLA.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cgpt_jax.kernels import build as kernel_build
from cgpt_jax.kernels.build import KernelUnavailable, compiler

__all__ = ["KernelUnavailable", "build", "compiler", "load", "matmul"]

SOURCE = pathlib.Path(__file__).with_name("streaming_matmul.cc")
FLOAT_TARGET, QUANTIZED_TARGET = "cgpt_streaming_float_matmul", "cgpt_streaming_quantized_matmul"
TARGETS = (FLOAT_TARGET, QUANTIZED_TARGET)


def build() -> pathlib.Path:
    """The kernel's shared library for this machine: compiled on first use, then taken from the cache."""
    return kernel_build.build(SOURCE)


def load() -> pathlib.Path:
    """Build the kernel and register it with XLA:CPU, once per process; returns the library's path."""
    return kernel_build.load(SOURCE, ((FLOAT_TARGET, "StreamingFloatMatmul"),
                                      (QUANTIZED_TARGET, "StreamingQuantizedMatmul")))


def matmul(x_MxK: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, bits: int = 32,
           transposed: bool) -> jax.Array:
    """x · W → float32 [M, N]; call `load()` first.

    bits=32: w is W, float32, [K, N] (transposed=False) or stored [N, K] (transposed=True, such as the tied
    LM head), and scale is None. bits=8 or 4: w holds W's integers, [K, N] int8 or [K, N/2] uint8 (two int4
    values per byte along N, the low nibble first), transposed [N, K] or [N, K/2], and scale is [G, N]
    (transposed: [N, G]): the K inputs split into G groups of K/G consecutive ones, each with its own scale
    per output."""
    dtypes = {32: jnp.float32, 8: jnp.int8, 4: jnp.uint8}
    if bits not in dtypes:
        raise ValueError(f"streaming matmul: bits must be 32 (float32), 8 or 4, got {bits}")
    if (bits == 32) != (scale is None):
        raise ValueError(f"streaming matmul: a scale goes with quantized weights (bits 8 or 4) only; got bits={bits}")
    if w.dtype != dtypes[bits] or w.ndim != 2 or x_MxK.ndim != 2:
        raise ValueError(f"streaming matmul: expected x [M, K] and a 2-D {jnp.dtype(dtypes[bits]).name} weight for "
                         f"bits={bits}, got x {x_MxK.shape} and w {w.dtype}{list(w.shape)}")
    packing = 2 if bits == 4 else 1
    k, n = (w.shape[1] * packing, w.shape[0]) if transposed else (w.shape[0], w.shape[1] * packing)
    if x_MxK.shape[1] != k:
        raise ValueError(f"streaming matmul: x {x_MxK.shape} does not meet the weight's {k} inputs")
    out_type = jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32)
    x_MxK = x_MxK.astype(jnp.float32)
    if bits == 32:
        call = jax.ffi.ffi_call(FLOAT_TARGET, out_type, vmap_method="sequential")
        return call(x_MxK, w, transposed=np.int32(transposed))
    call = jax.ffi.ffi_call(QUANTIZED_TARGET, out_type, vmap_method="sequential")
    return call(x_MxK, w, scale, bits=np.int32(bits), transposed=np.int32(transposed))
