"""The decode step's projection weights laid out in column panels, for the streaming kernel on CPU.

A projection W [K, N] (its input axes first, flattened to K; float32, or the integers of a quantized
weight) is held as panels [N/64, K, 64]: panel p is W[:, 64p : 64p+64], one contiguous run of memory.
The kernel (`streaming_matmul.panel_matmul`) reads each panel as a single stream into sums held in
registers, where in W's own row-major layout it has to choose between many short runs and partial sums
that go through memory for every vector of weights (docs/performance.md measures both).

The generator lays out its per-layer weights so (`to_panels`) where the kernel runs: on CPU, with the
kernel built, on one device. A `PanelArray` reads like the weight it replaces: `param[...]` is the weight
in its own shape, and the model's projections (`layers.project`) call `matmul_rows`, which runs the
kernel at any number of rows, a prefill's too: with blocks of 6 rows of x against a panel it keeps up
with XLA's GEMM, which could read panels only after copying them back into [K, N] (docs/performance.md).
Quantized weights keep their scales [G, N].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.kernels.streaming_matmul import PANEL
from cgpt_jax.model import few_rows
from cgpt_jax.quantize.array import QuantizedArray, dequantize
from cgpt_jax.quantize.model import input_span
from cgpt_jax.treepath import path_name


@dataclasses.dataclass(frozen=True)
class PanelArray:
    panels: jax.Array                # [N/PANEL, K, PANEL] float32 or int8; int4: [N/PANEL, K, PANEL/2] uint8
    scale: jax.Array | None          # quantized: [G, N] float32
    shape: tuple[int, ...]           # the weight's shape, its `inputs` leading axes flattened to K
    inputs: int
    bits: int                        # 32 (float32), 8 or 4

    @property
    def nbytes(self) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in (self.panels, self.scale) if x is not None)

    def dense(self) -> jax.Array:
        """The float32 weight in its own shape (dequantized)."""
        count, inputs, width = self.panels.shape
        stored = self.panels.transpose(1, 0, 2).reshape(inputs, count * width)  # [K, N] (int4: [K, N/2] bytes)
        if self.bits == 32:
            return stored.reshape(self.shape)
        quantized = QuantizedArray(stored, self.scale, (-2, -1), self.bits)
        return dequantize(quantized).reshape(self.shape)

    def __getitem__(self, key: Any) -> jax.Array:
        # How the model reads a parameter (`self.kernel[...]`).
        return self.dense()[key]

    def matmul_rows(self, x_BxLxK: jax.Array) -> jax.Array:
        """x @ W over x's last axis and W's input axes → float32 [B, L, N]: the kernel on CPU at any number
        of rows (`few_rows.uses_kernel`), elsewhere XLA's matmul on the weight put back into [K, N]."""
        if few_rows.uses_kernel(x_BxLxK, quantized=self.bits != 32, panels=True):
            return few_rows.panel_matmul(x_BxLxK, self.panels, self.scale, bits=self.bits)
        batch, length, inputs = x_BxLxK.shape
        w_KxN = self.dense().reshape(inputs, -1).astype(x_BxLxK.dtype)
        y_MxN = jnp.dot(x_BxLxK.reshape(-1, inputs), w_KxN, preferred_element_type=jnp.float32)
        return y_MxN.reshape(batch, length, -1)


jax.tree_util.register_dataclass(PanelArray, data_fields=["panels", "scale"], meta_fields=["shape", "inputs", "bits"])


def panel_array(value: jax.Array | QuantizedArray, inputs: int) -> PanelArray | None:
    """`value` (its first `inputs` axes the matmul's inputs) as panels, or None where it has no whole
    number of panels (N not a multiple of PANEL) or a quantized layout the kernel does not take."""
    shape = tuple(value.shape)
    k, n = math.prod(shape[:inputs]), math.prod(shape[inputs:])
    if n % PANEL or k == 0:
        return None
    if isinstance(value, QuantizedArray):
        if value.contract != (-value.ndim, inputs - value.ndim):
            return None
        stored, scale, bits = value.qvalue.reshape(k, -1), value.scale.reshape(value.scale.shape[0], n), value.bits
    else:
        stored, scale, bits = value.astype(jnp.float32).reshape(k, n), None, 32
    width = PANEL // 2 if bits == 4 else PANEL
    panels = stored.reshape(k, n // PANEL, width).transpose(1, 0, 2)
    return PanelArray(panels, scale, shape, inputs, bits)


def to_panels(state: nnx.State) -> nnx.State:
    """A layer's state with each projection weight (float32 or quantized, inputs first, N a multiple of
    PANEL) replaced by its PanelArray; everything else as it was. Jit it: the panels are new arrays."""
    def one(path, var):
        if not isinstance(var, nnx.Param):
            return var
        span, value = input_span(path_name(path), var), var.get_value()
        if span is None:
            return var
        # The logical axes may still name a leading 'layers' axis that this layer's slice no longer has.
        start, end = (axis - len(var.get_metadata()["logical_axes"]) + value.ndim for axis in span)
        if start != 0 or end >= value.ndim:
            return var  # not a projection whose inputs come first (the token table)
        panels = panel_array(value, end)
        return var if panels is None else var.replace(panels)
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def kernel_runs() -> bool:
    """Whether the decode step's projections run the kernel here (CPU, the kernel built): only then are
    panels worth laying out."""
    return jax.default_backend() == "cpu" and few_rows.kernel_loaded()
