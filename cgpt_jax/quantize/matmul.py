"""x @ W for a quantized weight W: the C++ kernel on CPU for the few rows of a decode step, XLA's
dequantize-then-matmul elsewhere.

W's input axes (its `contract` span) are the ones x's last axis meets; the others, flattened, are the
output. A projection keeps its inputs first (W viewed as [K, N]); the tied LM head `wte` [V, D] keeps
them last ([N, K], used transposed). XLA:CPU writes a multi-row matmul's dequantized weight out and reads
it back (docs/quantization.md), so on CPU with float32 activations and at most `KERNEL_MAX_ROWS` rows the
kernel (`cgpt_jax/kernels/quantized_matmul.py`) reads the integers once instead. More rows (a prefill)
are compute-bound, where XLA's GEMM on the dequantized weight is faster.

Under a mesh (`activation_sharding`) the kernel runs on each device's rows (x split by 'batch' and
'length' as activations are) against the whole weight, which XLA gathers from its shards first, as FSDP
does; rows that the mesh does not divide take XLA's path.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from cgpt_jax.kernels import quantized_matmul
from cgpt_jax.parallel.sharding import fits_shards, map_shards

if TYPE_CHECKING:
    from cgpt_jax.quantize.array import QuantizedArray

KERNEL_MAX_ROWS = 32
ROW_AXES = ("batch", "length", None)
_switch = threading.local()


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """While tracing inside this context, quantized matmuls take XLA's path (the benchmark's baseline, the
    tests' reference)."""
    previous = getattr(_switch, "xla_only", False)
    _switch.xla_only = True
    try:
        yield
    finally:
        _switch.xla_only = previous


@functools.cache
def _kernel_loaded() -> bool:
    try:
        quantized_matmul.load()
        return True
    except quantized_matmul.KernelUnavailable as error:
        warnings.warn(f"quantized matmuls dequantize through XLA on CPU: {error}", stacklevel=2)
        return False


def _transposed(w: QuantizedArray) -> bool | None:
    """False: inputs first (a projection, [K, N]); True: inputs last (the head, [N, K]); None: neither."""
    a, b = (axis + w.ndim for axis in w.contract)
    if a == 0 and b < w.ndim:
        return False
    if b == w.ndim and a > 0:
        return True
    return None


def uses_kernel(w: QuantizedArray, x_BxLxI: jax.Array) -> bool:
    """Whether `matmul_rows(w, x)` runs the C++ kernel (CPU, float32, few rows, a mesh that divides them)."""
    batch, length, _ = x_BxLxI.shape
    return (not getattr(_switch, "xla_only", False) and jax.default_backend() == "cpu"
            and x_BxLxI.dtype == jnp.float32 and _transposed(w) is not None and batch * length <= KERNEL_MAX_ROWS
            and fits_shards(x_BxLxI.shape, ROW_AXES) and _kernel_loaded())


def matmul_rows(w: QuantizedArray, x_BxLxI: jax.Array) -> jax.Array:
    """x @ W over x's last axis and W's input axes → float32 [B, L, N] (N: W's other axes, flattened)."""
    if not uses_kernel(w, x_BxLxI):
        return _dequantized_rows(w, x_BxLxI)
    kernel = functools.partial(_kernel_rows, contract=w.contract, bits=w.bits, transposed=_transposed(w))
    whole_qvalue, whole_scale = (None,) * w.qvalue.ndim, (None,) * w.scale.ndim  # every device reads all of W
    return map_shards(kernel, (ROW_AXES, whole_qvalue, whole_scale), ROW_AXES)(x_BxLxI, w.qvalue, w.scale)


def _kernel_rows(x_BxLxI: jax.Array, qvalue: jax.Array, scale: jax.Array, *, contract: tuple[int, int], bits: int,
                 transposed: bool) -> jax.Array:
    batch, length, inputs = x_BxLxI.shape
    if transposed:  # [*out, *in]: outputs are the leading axes
        outputs = math.prod(qvalue.shape[:contract[0] + qvalue.ndim])
        q_NxK, scale_NxG = qvalue.reshape(outputs, -1), scale.reshape(outputs, -1)
        y_MxN = quantized_matmul.matmul(x_BxLxI.reshape(-1, inputs), q_NxK, scale_NxG, bits=bits, transposed=True)
    else:  # [*in, *out]: the scale is [G, 1, ..., *out]
        q_KxN, scale_GxN = qvalue.reshape(inputs, -1), scale.reshape(scale.shape[0], -1)
        y_MxN = quantized_matmul.matmul(x_BxLxI.reshape(-1, inputs), q_KxN, scale_GxN, bits=bits, transposed=False)
    return y_MxN.reshape(batch, length, -1)


def _dequantized_rows(w: QuantizedArray, x_BxLxI: jax.Array) -> jax.Array:
    """XLA's path: the dequantized weight, contracted with the [B·L, I] rows over its input axes."""
    batch, length, inputs = x_BxLxI.shape
    a, b = (axis + w.ndim for axis in w.contract)
    w_dequantized = w.dequantize().astype(x_BxLxI.dtype)
    w_AxKxC = w_dequantized.reshape(*w.shape[:a], inputs, *w.shape[b:])
    y_MxAxC = jnp.tensordot(x_BxLxI.reshape(-1, inputs), w_AxKxC, axes=(1, a), preferred_element_type=jnp.float32)
    return y_MxAxC.reshape(batch, length, -1)
