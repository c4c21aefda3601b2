"""Small building blocks shared by the decoder and the attention variants."""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import few_rows, parameterization
from cgpt_jax.parallel.sharding import LogicalAxes, constrain


def weight_param(rngs: nnx.Rngs, cfg: ml_collections.ConfigDict, group: str, shape: tuple[int, ...],
                 axes: LogicalAxes) -> nnx.Param:
    """A weight of parameterization group `group` (a matrix or an embedding), declared as such: Normal(0,
    std²) truncated at ±2·std with the group's std (`parameterization.init_std`), as torch's
    trunc_normal_(std, a=-2std, b=2std) used by Cerebras.

    (jax.nn.initializers.truncated_normal rescales so the *truncated* std equals `std`; Cerebras does not.)
    """
    std = parameterization.init_std(cfg, group)
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(jnp.dtype(cfg.param_dtype)), logical_axes=axes,
                     **{parameterization.GROUP_KEY: group, parameterization.INIT_KEY: "trunc_normal"})


def constant_param(init: Literal["zeros", "ones"], shape: tuple[int, ...], axes: LogicalAxes, dtype: jnp.dtype,
                   group: str) -> nnx.Param:
    """A parameter of `group` initialised to zeros or ones (biases, LayerNorm), declared as such."""
    value = jnp.ones(shape, dtype) if init == "ones" else jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=axes, **{parameterization.GROUP_KEY: group, parameterization.INIT_KEY: init})


def bias_param(shape: tuple[int, ...], axes: LogicalAxes, dtype: jnp.dtype) -> nnx.Param:
    return constant_param("zeros", shape, axes, dtype, "bias")


def matmul_rows(x_BxLxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w over the last axis, computed as one 2-D matmul on the [B·L, I] rows.

    Same result as einsum('bli,io->blo'); the 2-D form is faster on XLA:CPU, which computes a 3-D einsum's
    weight gradient (a contraction over both B and L) through a transposed copy of the activations.
    """
    batch, length, _ = x_BxLxI.shape
    return (x_BxLxI.reshape(batch * length, -1) @ w_IxO).reshape(batch, length, -1)


def project(x_BxLxI: jax.Array, kernel: nnx.Variable, dtype: jnp.dtype) -> jax.Array:
    """x @ kernel over x's last axis and the kernel's leading axes (their product is I), its other axes
    flattened: `matmul_rows`, or for few rows on CPU the streaming kernel (`few_rows`). A quantized kernel
    (cgpt_jax/quantize) multiplies its integers without writing out the float weight where it can."""
    value = kernel.get_value()
    x_BxLxI = x_BxLxI.astype(dtype)
    if hasattr(value, "matmul_rows"):
        return value.matmul_rows(x_BxLxI).astype(dtype)
    w_IxO = kernel[...].astype(dtype).reshape(x_BxLxI.shape[-1], -1)
    if few_rows.uses_kernel(x_BxLxI, quantized=False):
        return few_rows.matmul(x_BxLxI, w_IxO, transposed=False)
    return matmul_rows(x_BxLxI, w_IxO)


def take_rows(table: nnx.Variable, ids: jax.Array) -> jax.Array:
    """table[ids] along the first axis (an embedding lookup). A quantized table (cgpt_jax/quantize) gathers
    its integer rows and dequantizes only those, instead of the whole table."""
    value = table.get_value()
    if hasattr(value, "take_rows"):
        return value.take_rows(ids)
    return jnp.take(value, ids, axis=0)


def logits_rows(x_BxLxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
    """x @ wᵀ over the last axis in float32: the tied LM head, on the [B·L, D] rows like `matmul_rows`.

    On CPU the backward pass computes the weight gradient as (xᵀ·g)ᵀ, [D, V] then transposed, instead of
    gᵀ·x: XLA:CPU's matmul is 2-2.5x faster when the output's last axis is the long one (measured at
    V=512, D=64: 154 vs 61 GFLOP/s), and the step 4% faster at the ladder and d256 shapes. The optimisation
    barrier keeps XLA from folding the transpose back. Elsewhere it is a plain dot.
    """
    batch, length, d_model = x_BxLxD.shape
    x_NxD = x_BxLxD.reshape(batch * length, d_model)
    head = _cpu_oriented_head if jax.default_backend() == "cpu" else _head
    return head(x_NxD, w_VxD).reshape(batch, length, -1)


def tied_logits(x_BxLxD: jax.Array, table: nnx.Variable, dtype: jnp.dtype) -> jax.Array:
    """`logits_rows` against the token table, or for few rows on CPU the streaming kernel (`few_rows`); a
    quantized table (cgpt_jax/quantize) multiplies its integers without writing out the float table where
    it can."""
    value = table.get_value()
    if hasattr(value, "matmul_rows"):
        return value.matmul_rows(x_BxLxD.astype(dtype))
    w_VxD = table[...].astype(dtype)
    if few_rows.uses_kernel(x_BxLxD, quantized=False) and w_VxD.dtype == jnp.float32:
        return few_rows.matmul(x_BxLxD, w_VxD, transposed=True)
    return logits_rows(x_BxLxD, w_VxD)


def _head(x_NxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
    return jnp.einsum("nd,vd->nv", x_NxD, w_VxD, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _cpu_oriented_head(x_NxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
    return _head(x_NxD, w_VxD)


def _cpu_oriented_head_fwd(x_NxD: jax.Array, w_VxD: jax.Array):
    return _head(x_NxD, w_VxD), (x_NxD, w_VxD)


def _cpu_oriented_head_bwd(residuals, g_NxV: jax.Array):
    x_NxD, w_VxD = residuals
    g_NxV = g_NxV.astype(x_NxD.dtype)
    dx_NxD = g_NxV @ w_VxD
    dw_DxV = jax.lax.optimization_barrier(x_NxD.T @ g_NxV)
    return dx_NxD, dw_DxV.T.astype(w_VxD.dtype)


_cpu_oriented_head.defvjp(_cpu_oriented_head_fwd, _cpu_oriented_head_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.scale = constant_param("ones", (dim,), ("norm",), dtype, "layernorm")
        self.bias = constant_param("zeros", (dim,), ("norm",), dtype, "layernorm")

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        f32 = jnp.float32
        y = layer_norm(x_BxLxD.astype(f32), self.scale[...].astype(f32), self.bias[...].astype(f32), self.eps)
        return y.astype(x_BxLxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_NxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) · scale + bias over the last axis (any leading axes).

    The gradient is written out (the textbook LayerNorm backward, from the normalized x and 1/std saved by
    the forward pass) instead of differentiated through mean and variance: autodiff's version keeps
    more intermediates and makes more passes, which XLA:CPU does not fuse away. Same values to float32
    rounding (tests/test_model.py); measured: the train step 2-4% faster at d64, d128 and d256, level at d48
    and d80.
    """
    return _layer_norm_fwd(x_NxD, scale_D, bias_D, eps)[0]


def _layer_norm_fwd(x_NxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float):
    centered_NxD = x_NxD - x_NxD.mean(-1, keepdims=True)
    rstd_Nx1 = jax.lax.rsqrt(jnp.square(centered_NxD).mean(-1, keepdims=True) + eps)
    normed_NxD = centered_NxD * rstd_Nx1
    return normed_NxD * scale_D + bias_D, (normed_NxD, rstd_Nx1, scale_D)


def _layer_norm_bwd(eps: float, residuals, g_NxD: jax.Array):
    normed_NxD, rstd_Nx1, scale_D = residuals
    leading_axes = tuple(range(g_NxD.ndim - 1))
    g_normed_NxD = g_NxD * scale_D
    # d normed / dx removes the mean and the component along normed, then scales by 1/std.
    dx_NxD = rstd_Nx1 * (g_normed_NxD - g_normed_NxD.mean(-1, keepdims=True)
                         - normed_NxD * (g_normed_NxD * normed_NxD).mean(-1, keepdims=True))
    return dx_NxD, (g_NxD * normed_NxD).sum(leading_axes), g_NxD.sum(leading_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x) = 0.5·x·(1 + erf(x/√2)): PyTorch's and Cerebras's definition.

    jax.nn.gelu(approximate=False) evaluates Φ through erfc, which XLA:CPU computes 2.5x slower than
    erf; the two differ by at most 1e-6 (float32 rounding, measured over [-12, 12]). Measured: the
    train step 2-4% faster at the CPU ladder sizes.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))  # Python floats keep x's dtype


class MLP(nnx.Module):
    """d_model → d_ff → d_model with exact (erf) GELU and biases (model.d_model, model.d_ff)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        d_model, d_ff, param_dtype = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.up_kernel = weight_param(rngs, cfg, "mlp_input", (d_model, d_ff), ("embed", "mlp"))
        self.up_bias = bias_param((d_ff,), ("mlp",), param_dtype)
        self.down_kernel = weight_param(rngs, cfg, "mlp_output", (d_ff, d_model), ("mlp", "embed"))
        self.down_bias = bias_param((d_model,), ("embed",), param_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        h_BxLxF = project(x_BxLxD, self.up_kernel, dt)
        h_BxLxF = gelu(h_BxLxF + self.up_bias[...].astype(dt))
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        y_BxLxD = project(h_BxLxF, self.down_kernel, dt)
        return y_BxLxD + self.down_bias[...].astype(dt)
