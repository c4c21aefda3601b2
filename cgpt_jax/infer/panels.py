"""The decode step's projections and tied token table laid out in column panels, for the streaming kernel
on CPU.

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

The tied token table [V, D] is laid out likewise, as the panels of its transpose [D, V] with V padded
by zero columns to whole panels (`token_table`): the LM head x @ tableᵀ is then one more panel matmul,
and the embedding lookup (`take_rows`) gathers each id's column of its panel.
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
from cgpt_jax.quantize.array import QuantizedArray, dequantize, pack_int4, unpack_int4
from cgpt_jax.quantize.model import input_span
from cgpt_jax.treepath import path_name


@dataclasses.dataclass(frozen=True)
class PanelArray:
    panels: jax.Array                # [P, K, PANEL] float32 or int8; int4: [P, K, PANEL/2] uint8; P·PANEL >= N
    scale: jax.Array | None          # quantized: [G, P·PANEL] float32
    shape: tuple[int, ...]           # the weight's shape
    inputs: int                      # how many of its axes are the inputs (flattened to K): the first ones
    bits: int                        # 32 (float32), 8 or 4
    table: bool = False              # the token table [V, D]: its input axis last, padded to whole panels

    @property
    def nbytes(self) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in (self.panels, self.scale) if x is not None)

    @property
    def columns(self) -> int:
        """N, the matmul's outputs: the panels hold it and, for the table, up to PANEL - 1 zero columns."""
        inputs = self.shape[-self.inputs:] if self.table else self.shape[:self.inputs]
        return math.prod(self.shape) // math.prod(inputs)

    def weight_KxN(self) -> jax.Array:
        """The float32 weight as the matmul reads it, [K, N] (dequantized)."""
        count, inputs, width = self.panels.shape
        stored = self.panels.transpose(1, 0, 2).reshape(inputs, count * width)  # int4: [K, P·PANEL/2] bytes
        if self.bits != 32:
            stored = dequantize(QuantizedArray(stored, self.scale, (-2, -1), self.bits))
        return stored[:, :self.columns]

    def dense(self) -> jax.Array:
        """The float32 weight in its own shape (dequantized)."""
        w_KxN = self.weight_KxN()
        return (w_KxN.T if self.table else w_KxN).reshape(self.shape)

    def __getitem__(self, key: Any) -> jax.Array:
        # How the model reads a parameter (`self.kernel[...]`).
        return self.dense()[key]

    def matmul_rows(self, x_BxLxK: jax.Array) -> jax.Array:
        """x @ W over x's last axis and W's input axes (the table: x @ tableᵀ, the LM head) → float32
        [B, L, N]: the kernel on CPU at any number of rows (`few_rows.uses_kernel`), elsewhere XLA's matmul
        on the weight put back into [K, N]."""
        if few_rows.uses_kernel(x_BxLxK, quantized=self.bits != 32, panels=True):
            y_BxLxP = few_rows.panel_matmul(x_BxLxK, self.panels, self.scale, bits=self.bits)
            return y_BxLxP[..., :self.columns]
        batch, length, inputs = x_BxLxK.shape
        y_MxN = jnp.dot(x_BxLxK.reshape(-1, inputs), self.weight_KxN().astype(x_BxLxK.dtype),
                        preferred_element_type=jnp.float32)
        return y_MxN.reshape(batch, length, -1)

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """The token table's rows `ids` → float32 [*ids.shape, D] (an embedding lookup): each id's column of
        its panel, dequantized, without the rest of the table."""
        if not self.table:
            raise ValueError("take_rows reads rows of the token table; this PanelArray is a projection")
        panel, column = ids // PANEL, ids % PANEL
        if self.bits == 4:
            pairs = unpack_int4(self.panels[panel, :, column // 2][..., None])  # [..., D, 2]: even, odd column
            q = jnp.where((column % 2 == 1)[..., None], pairs[..., 1], pairs[..., 0])
        else:
            q = self.panels[panel, :, column]
        if self.bits == 32:
            return q
        scale_IxG = jnp.moveaxis(self.scale[:, ids], 0, -1)  # I: the ids' axes
        return dequantize(QuantizedArray(q, scale_IxG, (-1, 0), 8))  # int4 values unpacked: stored as int8


jax.tree_util.register_dataclass(PanelArray, data_fields=["panels", "scale"],
                                 meta_fields=["shape", "inputs", "bits", "table"])


def _panels(stored_KxN: jax.Array, bits: int) -> jax.Array:
    """[K, N] (int4: [K, N/2] bytes, N a multiple of PANEL) → [N/PANEL, K, PANEL] (int4: PANEL/2 bytes)."""
    width = PANEL // 2 if bits == 4 else PANEL
    return stored_KxN.reshape(stored_KxN.shape[0], -1, width).transpose(1, 0, 2)


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
    return PanelArray(_panels(stored, bits), scale, shape, inputs, bits)


def token_table(value: jax.Array | QuantizedArray) -> PanelArray | None:
    """The tied token table [V, D] (float32, or quantized over D) as the panels of its transpose [D, V], V
    padded with zero columns to whole panels; None for a layout the kernel does not take. Jit it."""
    if len(value.shape) != 2 or 0 in value.shape:
        return None
    pad = ((0, -value.shape[0] % PANEL), (0, 0))
    if isinstance(value, QuantizedArray):
        if value.contract != (-1, 0):
            return None
        q_VxD = unpack_int4(value.qvalue) if value.bits == 4 else value.qvalue
        q_DxV = jnp.pad(q_VxD, pad).T
        stored, scale, bits = (pack_int4(q_DxV) if value.bits == 4 else q_DxV), jnp.pad(value.scale, pad).T, value.bits
    else:
        stored, scale, bits = jnp.pad(value.astype(jnp.float32), pad).T, None, 32
    return PanelArray(_panels(stored, bits), scale, tuple(value.shape), 1, bits, table=True)


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
    """Whether the decode step's projections and LM head run the kernel here (CPU, the kernel built): only
    then are panels worth laying out."""
    return jax.default_backend() == "cpu" and few_rows.kernel_loaded()
