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

__all__ = ["KernelUnavailable", "PANEL", "build", "compiler", "load", "matmul", "panel_matmul"]

SOURCE = pathlib.Path(__file__).with_name("streaming_matmul.cc")
FLOAT_TARGET, QUANTIZED_TARGET = "cgpt_streaming_float_matmul", "cgpt_streaming_quantized_matmul"
FLOAT_PANEL_TARGET, QUANTIZED_PANEL_TARGET = "cgpt_streaming_float_panel_matmul", "cgpt_streaming_quantized_panel_matmul"
TARGETS = (FLOAT_TARGET, QUANTIZED_TARGET, FLOAT_PANEL_TARGET, QUANTIZED_PANEL_TARGET)
PANEL = 64  # columns per panel (`panel_matmul`); the kernel's T


def build() -> pathlib.Path:
    """The kernel's shared library for this machine: compiled on first use, then taken from the cache."""
    return kernel_build.build(SOURCE)


def load() -> pathlib.Path:
    """Build the kernel and register it with XLA:CPU, once per process; returns the library's path."""
    return kernel_build.load(SOURCE, ((FLOAT_TARGET, "StreamingFloatMatmul"),
                                      (QUANTIZED_TARGET, "StreamingQuantizedMatmul"),
                                      (FLOAT_PANEL_TARGET, "StreamingFloatPanelMatmul"),
                                      (QUANTIZED_PANEL_TARGET, "StreamingQuantizedPanelMatmul")))


_DTYPES = {32: jnp.float32, 8: jnp.int8, 4: jnp.uint8}


def matmul(x_MxK: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, bits: int = 32,
           transposed: bool) -> jax.Array:
    """x · W → float32 [M, N]; call `load()` first.

    bits=32: w is W, float32, [K, N] (transposed=False) or stored [N, K] (transposed=True, such as the tied
    LM head), and scale is None. bits=8 or 4: w holds W's integers, [K, N] int8 or [K, N/2] uint8 (two int4
    values per byte along N, the low nibble first), transposed [N, K] or [N, K/2], and scale is [G, N]
    (transposed: [N, G]): the K inputs split into G groups of K/G consecutive ones, each with its own scale
    per output."""
    if bits not in _DTYPES:
        raise ValueError(f"streaming matmul: bits must be 32 (float32), 8 or 4, got {bits}")
    if (bits == 32) != (scale is None):
        raise ValueError(f"streaming matmul: a scale goes with quantized weights (bits 8 or 4) only; got bits={bits}")
    if w.dtype != _DTYPES[bits] or w.ndim != 2 or x_MxK.ndim != 2:
        raise ValueError(f"streaming matmul: expected x [M, K] and a 2-D {jnp.dtype(_DTYPES[bits]).name} weight for "
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


def panel_matmul(x_MxK: jax.Array, panels: jax.Array, scale: jax.Array | None = None, *, bits: int = 32) -> jax.Array:
    """x · W → float32 [M, N] for W [K, N] stored as panels of PANEL columns: panels[p] = W[:, p·PANEL:
    (p+1)·PANEL], [N/PANEL, K, PANEL] float32 or int8, or [N/PANEL, K, PANEL/2] uint8 for int4 (packed as in
    `matmul`), with scale [G, N] for quantized panels; call `load()` first. A panel is one contiguous run of
    memory, which the kernel reads as a single stream into sums held in registers (`cgpt_jax/infer/panels.py`
    lays a decode step's projections out so)."""
    if bits not in _DTYPES:
        raise ValueError(f"streaming matmul: bits must be 32 (float32), 8 or 4, got {bits}")
    if (bits == 32) != (scale is None):
        raise ValueError(f"streaming matmul: a scale goes with quantized panels (bits 8 or 4) only; got bits={bits}")
    width = PANEL // 2 if bits == 4 else PANEL
    if panels.dtype != _DTYPES[bits] or panels.ndim != 3 or panels.shape[2] != width or x_MxK.ndim != 2:
        raise ValueError(f"streaming matmul: expected x [M, K] and {jnp.dtype(_DTYPES[bits]).name} panels "
                         f"[N/{PANEL}, K, {width}] for bits={bits}, got x {x_MxK.shape} and panels "
                         f"{panels.dtype}{list(panels.shape)}")
    if x_MxK.shape[1] != panels.shape[1]:
        raise ValueError(f"streaming matmul: x {x_MxK.shape} does not meet the panels' {panels.shape[1]} inputs")
    out_type = jax.ShapeDtypeStruct((x_MxK.shape[0], panels.shape[0] * PANEL), jnp.float32)
    x_MxK = x_MxK.astype(jnp.float32)
    if bits == 32:
        return jax.ffi.ffi_call(FLOAT_PANEL_TARGET, out_type, vmap_method="sequential")(x_MxK, panels)
    call = jax.ffi.ffi_call(QUANTIZED_PANEL_TARGET, out_type, vmap_method="sequential")
    return call(x_MxK, panels, scale, bits=np.int32(bits))
