"""A weight stored as integers and scales, and the arithmetic of quantizing and dequantizing it.

A weight W whose input (contraction) axes are `contract = (a, b)`, i.e. W.shape[a:b] (stored counted
from the end, so that slicing off a leading 'layers' axis keeps them right), is viewed as
[..., G, g, ...]: the C = prod(shape[a:b]) input elements of each output channel split into G groups of g
consecutive ones (g = C for a per-channel scheme). Each group gets scale = absmax / qmax and
q = round(W / scale) ∈ [-qmax, qmax], so |W - q·scale| <= scale / 2 elementwise.

Storage keeps W's rank so that the logical-axis sharding rules apply to both arrays: `qvalue` has W's
shape (int8), or for 4 bits uint8 with two values per byte along the last axis (low nibble first);
`scale` (float32) has W's shape with axis a replaced by G and axes a+1..b-1 by 1.

Reading the weight the way the model reads a parameter, `param[...]`, gives the dequantized float32 array,
so any code of the model runs unchanged on the dequantized values (inside the jitted program: the float
weight exists only transiently, op by op). The model's projections and tied head call `matmul_rows`
instead, and the embedding lookups `take_rows`, which read the integers without the whole float weight.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from cgpt_jax.quantize import matmul
from cgpt_jax.quantize.scheme import Scheme


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    qvalue: jax.Array
    scale: jax.Array
    contract: tuple[int, int]  # input axes a..b-1, counted from the end (< 0): leading axes may be sliced off
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        *lead, last = self.qvalue.shape
        return (*lead, last * 2 if self.bits == 4 else last)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (self.qvalue, self.scale))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def __getitem__(self, key: Any) -> jax.Array:
        # How the model reads a parameter (`self.kernel[...]`, `self.wte[...]`).
        return dequantize(self)[key]

    def matmul_rows(self, x_BxLxI: jax.Array) -> jax.Array:
        """x @ W over x's last axis and W's input axes → float32 [B, L, N], N the other axes flattened
        (`cgpt_jax/quantize/matmul.py`: a C++ kernel on CPU for few rows, without the float weight)."""
        return matmul.matmul_rows(self, x_BxLxI)

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """dequantize(self)[ids] along the first axis, dequantizing only the gathered rows (an embedding
        lookup); the first axis must not be an input axis."""
        if self.contract[0] == -self.ndim:
            raise ValueError("take_rows gathers whole rows: the first axis must not be one the scales group")
        return dequantize(jax.tree.map(lambda x: jnp.take(x, ids, axis=0), self))

    def shardings(self, mesh: jax.sharding.Mesh, spec: PartitionSpec) -> QuantizedArray:
        """The weight's PartitionSpec (from its logical axes) applied to qvalue and scale: a dimension
        that the mesh axes do not divide (a scale's size-1 or group axis, a packed axis) stays whole."""
        def fit(shape: tuple[int, ...]) -> NamedSharding:
            entries = [entry if entry is not None and dim % _mesh_size(mesh, entry) == 0 else None
                       for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
            return NamedSharding(mesh, PartitionSpec(*entries))
        return dataclasses.replace(self, qvalue=fit(self.qvalue.shape), scale=fit(self.scale.shape))


jax.tree_util.register_dataclass(QuantizedArray, data_fields=["qvalue", "scale"], meta_fields=["contract", "bits"])


def _mesh_size(mesh: jax.sharding.Mesh, entry: str | tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))


def grouped_shape(shape: tuple[int, ...], a: int, b: int, group: int | None) -> tuple[int, ...]:
    """W's shape with the input axes a..b-1 (0 <= a < b) flattened and split into [G, g]."""
    inputs = math.prod(shape[a:b])
    g = inputs if group is None else group
    return (*shape[:a], inputs // g, g, *shape[b:])


def quantize(w: jax.Array, scheme: Scheme, contract: tuple[int, int]) -> QuantizedArray:
    """Symmetric absmax quantization of `w` per output channel and input group (module docstring).
    The caller has checked that the group divides the input size and, for 4 bits, that the last axis is even."""
    a, b = contract  # 0 <= a < b <= w.ndim
    w_grouped = w.astype(jnp.float32).reshape(grouped_shape(w.shape, a, b, scheme.group))
    absmax = jnp.max(jnp.abs(w_grouped), axis=a + 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / scheme.qmax, 1.0)  # an all-zero group: any scale, q = 0
    q = jnp.clip(jnp.round(w_grouped / scale), -scheme.qmax, scheme.qmax).astype(jnp.int8).reshape(w.shape)
    scale_shape = (*w.shape[:a], scale.shape[a], *(1,) * (b - a - 1), *w.shape[b:])
    qvalue = pack_int4(q) if scheme.bits == 4 else q
    return QuantizedArray(qvalue, scale.reshape(scale_shape), (a - w.ndim, b - w.ndim), scheme.bits)


def dequantize(x: QuantizedArray) -> jax.Array:
    """q · scale as float32, in the weight's shape."""
    a, b = (axis + x.ndim for axis in x.contract)
    q = unpack_int4(x.qvalue) if x.bits == 4 else x.qvalue
    groups = x.scale.shape[a]
    q_grouped = q.reshape(grouped_shape(x.shape, a, b, math.prod(x.shape[a:b]) // groups))
    scale = x.scale.reshape((*x.shape[:a], groups, 1, *x.shape[b:]))
    return (q_grouped.astype(jnp.float32) * scale).reshape(x.shape)


def pack_int4(q: jax.Array) -> jax.Array:
    """int8 values in [-8, 7], last axis even → uint8 with two 4-bit two's-complement values per byte."""
    nibbles = jax.lax.bitcast_convert_type(q, jnp.uint8) & 0xF
    pairs = nibbles.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_int4`: arithmetic shifts of the signed byte sign-extend each nibble."""
    signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
    low, high = (signed << 4) >> 4, signed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
