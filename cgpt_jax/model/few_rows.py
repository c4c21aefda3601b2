"""x @ W for few rows (a decode step): on CPU through the streaming kernel, elsewhere XLA's matmul. One
decision for float32 and quantized weights.

With a few rows a matmul reads each weight once for a few multiply-adds, so its speed is the speed at
which W streams from memory; the kernel (`cgpt_jax/kernels/streaming_matmul.py`) reads it at the machine's
bandwidth, XLA:CPU's GEMM below it, and for a quantized W XLA also writes the dequantized float32 weight
out and reads it back (docs/quantization.md). More rows (a prefill, training) are compute-bound, where
XLA's GEMM is faster: the crossover, measured on the 111M shapes, is between 16 and 32 rows for float32
weights (`MAX_ROWS`), above 32 for quantized ones, whose XLA path also pays the dequantization. The
callers are `layers.project` and `layers.tied_logits` for float weights, `cgpt_jax/quantize/matmul.py`
for quantized ones, and `cgpt_jax/infer/panels.py` for the generator's projections laid out in panels,
which run the kernel at any number of rows (`panel_matmul`).

Under a mesh (`activation_sharding`) the kernel runs on each device's rows (x split by 'batch' and
'length' as activations are) against the whole weight, which XLA gathers from its shards first, as FSDP
does; rows that the mesh does not divide take XLA's path. The float path is differentiable: its
gradient is XLA's, so a few-row training step runs too.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from cgpt_jax.kernels import build as kernel_build, streaming_matmul
from cgpt_jax.parallel.sharding import fits_shards, map_shards

MAX_ROWS = {"float": 16, "quantized": 32}  # the most rows that run the kernel, by weight kind
ROW_AXES = ("batch", "length", None)
_switch = threading.local()


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """While tracing inside this context, few-row matmuls take XLA's path (the benchmark's baseline, the
    tests' reference)."""
    previous = getattr(_switch, "xla_only", False)
    _switch.xla_only = True
    try:
        yield
    finally:
        _switch.xla_only = previous


@functools.cache
def kernel_loaded() -> bool:
    """Whether the kernel is built and registered (once per process; a failure warns once)."""
    return kernel_build.loads(streaming_matmul.load, "few-row matmuls run through XLA on CPU")


def uses_kernel(x_BxLxI: jax.Array, *, quantized: bool, panels: bool = False) -> bool:
    """Whether x's matmul with a float32 or a quantized weight runs the kernel: CPU, float32 activations, at
    most MAX_ROWS rows, a mesh that divides them. A weight laid out in panels (`cgpt_jax/infer/panels.py`)
    runs it at any number of rows: there the kernel keeps up with XLA's GEMM on a prefill's rows, which
    could only read the panels after copying them back into [K, N]."""
    batch, length, _ = x_BxLxI.shape
    few = panels or batch * length <= MAX_ROWS["quantized" if quantized else "float"]
    return (not getattr(_switch, "xla_only", False) and jax.default_backend() == "cpu"
            and x_BxLxI.dtype == jnp.float32 and few
            and fits_shards(x_BxLxI.shape, ROW_AXES) and kernel_loaded())


def matmul(x_BxLxK: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, bits: int = 32,
           transposed: bool) -> jax.Array:
    """x @ W over x's last axis through the kernel → float32 [B, L, N]; w (and scale) 2-D as
    `streaming_matmul.matmul` takes them. Call only where `uses_kernel(x)`."""
    if bits == 32:
        def float_kernel(x_BxLxK: jax.Array, w: jax.Array) -> jax.Array:
            return _float_rows(x_BxLxK, w, transposed)
        return map_shards(float_kernel, (ROW_AXES, (None, None)), ROW_AXES)(x_BxLxK, w)
    kernel = functools.partial(_quantized_rows, bits=bits, transposed=transposed)
    return map_shards(kernel, (ROW_AXES, (None, None), (None, None)), ROW_AXES)(x_BxLxK, w, scale)


def panel_matmul(x_BxLxK: jax.Array, panels: jax.Array, scale: jax.Array | None = None, *,
                 bits: int = 32) -> jax.Array:
    """x @ W over x's last axis through the kernel, W stored as panels (`streaming_matmul.panel_matmul`,
    `cgpt_jax/infer/panels.py`) → float32 [B, L, N]. Call only where `uses_kernel(x)`. Inference only:
    no gradient."""
    def kernel(x_BxLxK: jax.Array, panels: jax.Array, *scale: jax.Array) -> jax.Array:
        batch, length, inputs = x_BxLxK.shape
        y_MxN = streaming_matmul.panel_matmul(x_BxLxK.reshape(-1, inputs), panels, *scale, bits=bits)
        return y_MxN.reshape(batch, length, -1)
    scales = () if scale is None else (scale,)
    in_axes = (ROW_AXES, (None, None, None)) + ((None, None),) * len(scales)
    return map_shards(kernel, in_axes, ROW_AXES)(x_BxLxK, panels, *scales)


def _quantized_rows(x_BxLxK: jax.Array, q: jax.Array, scale: jax.Array, *, bits: int, transposed: bool) -> jax.Array:
    batch, length, inputs = x_BxLxK.shape
    y_MxN = streaming_matmul.matmul(x_BxLxK.reshape(-1, inputs), q, scale, bits=bits, transposed=transposed)
    return y_MxN.reshape(batch, length, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _float_rows(x_BxLxK: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    batch, length, inputs = x_BxLxK.shape
    y_MxN = streaming_matmul.matmul(x_BxLxK.reshape(-1, inputs), w, transposed=transposed)
    return y_MxN.reshape(batch, length, -1)


def _float_rows_fwd(x_BxLxK: jax.Array, w: jax.Array, transposed: bool):
    return _float_rows(x_BxLxK, w, transposed), (x_BxLxK, w)


def _float_rows_bwd(transposed: bool, residuals, g_BxLxN: jax.Array):
    x_BxLxK, w = residuals
    x_MxK, g_MxN = x_BxLxK.reshape(-1, x_BxLxK.shape[-1]), g_BxLxN.reshape(-1, g_BxLxN.shape[-1])
    w_KxN = w.T if transposed else w
    dx_MxK = g_MxN @ w_KxN.T
    dw_KxN = x_MxK.T @ g_MxN
    return dx_MxK.reshape(x_BxLxK.shape), (dw_KxN.T if transposed else dw_KxN)


_float_rows.defvjp(_float_rows_fwd, _float_rows_bwd)
