"""x @ W for a quantized weight W: the streaming kernel on CPU for the few rows of a decode step
(`cgpt_jax/model/few_rows.py` decides, as for float weights), XLA's dequantize-then-matmul elsewhere.

W's input axes (its `contract` span) are the ones x's last axis meets; the others, flattened, are the
output. A projection keeps its inputs first (W viewed as [K, N]); the tied LM head `wte` [V, D] keeps
them last ([N, K], used transposed).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from cgpt_jax.model import few_rows

if TYPE_CHECKING:
    from cgpt_jax.quantize.array import QuantizedArray


def _transposed(w: QuantizedArray) -> bool | None:
    """False: inputs first (a projection, [K, N]); True: inputs last (the head, [N, K]); None: neither."""
    a, b = (axis + w.ndim for axis in w.contract)
    if a == 0 and b < w.ndim:
        return False
    if b == w.ndim and a > 0:
        return True
    return None


def uses_kernel(w: QuantizedArray, x_BxLxI: jax.Array) -> bool:
    """Whether `matmul_rows(w, x)` runs the streaming kernel (`few_rows.uses_kernel`, W's inputs at one end)."""
    return _transposed(w) is not None and few_rows.uses_kernel(x_BxLxI, quantized=True)


def matmul_rows(w: QuantizedArray, x_BxLxI: jax.Array) -> jax.Array:
    """x @ W over x's last axis and W's input axes → float32 [B, L, N] (N: W's other axes, flattened)."""
    if not uses_kernel(w, x_BxLxI):
        return _dequantized_rows(w, x_BxLxI)
    inputs = x_BxLxI.shape[-1]
    if _transposed(w):  # [*out, *in]: outputs are the leading axes; the scale is [*out, G, 1, ...]
        outputs = math.prod(w.qvalue.shape[:w.contract[0] + w.ndim])
        q_NxK, scale_NxG = w.qvalue.reshape(outputs, -1), w.scale.reshape(outputs, -1)
        return few_rows.matmul(x_BxLxI, q_NxK, scale_NxG, bits=w.bits, transposed=True)
    # [*in, *out]: the scale is [G, 1, ..., *out]
    q_KxN, scale_GxN = w.qvalue.reshape(inputs, -1), w.scale.reshape(w.scale.shape[0], -1)
    return few_rows.matmul(x_BxLxI, q_KxN, scale_GxN, bits=w.bits, transposed=False)


def _dequantized_rows(w: QuantizedArray, x_BxLxI: jax.Array) -> jax.Array:
    """XLA's path: the dequantized weight, contracted with the [B·L, I] rows over its input axes."""
    batch, length, inputs = x_BxLxI.shape
    a, b = (axis + w.ndim for axis in w.contract)
    w_dequantized = w.dequantize().astype(x_BxLxI.dtype)
    w_AxKxC = w_dequantized.reshape(*w.shape[:a], inputs, *w.shape[b:])
    y_MxAxC = jnp.tensordot(x_BxLxI.reshape(-1, inputs), w_AxKxC, axes=(1, a), preferred_element_type=jnp.float32)
    return y_MxAxC.reshape(batch, length, -1)
