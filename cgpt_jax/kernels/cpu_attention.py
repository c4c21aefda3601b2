"""Causal softmax attention on XLA:CPU through a C++ kernel (`cpu_attention.cc`), forward and backward.

XLA:CPU runs attention as separate dots, a softmax and many small copies; at the CPU ladder's shapes
(head dim 16, 128 positions) the copies cost more than the arithmetic. The kernel computes each
(batch, head) pair's causal triangle in one pass and saves each query's largest logit and softmax
denominator, so the backward pass recomputes the probabilities instead of storing them (as
FlashAttention does).
Against float64, its values and gradients are as accurate as `base.attend`'s in float32 (within 2.5x of
its error, ≈1x at most shapes), also where one key dominates a row (tests/test_cpu_attention.py): the
backward pass recomputes the forward probabilities exactly and takes the softmax row term as Σ p·dL/dp.

`cached_attention` attends a decode step's few queries over a key/value cache, each reading only the
keys up to its own position (XLA scores every slot of the cache's bucket, padding rows' included).

The kernel is compiled for this machine on first use and cached (`cgpt_jax/kernels/build.py`); `build()`
and `load()` raise `KernelUnavailable` with the reason when that fails (no compiler, a compile error);
`fused` attention then runs JAX's XLA implementation instead.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cgpt_jax.kernels import build as kernel_build
from cgpt_jax.kernels.build import KernelUnavailable, compiler

__all__ = ["KernelUnavailable", "applies", "applies_cached", "build", "cached_attention", "causal_attention",
           "compiler", "load"]

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FORWARD_TARGET, BACKWARD_TARGET = "cgpt_causal_attention_forward", "cgpt_causal_attention_backward"
CACHED_TARGET = "cgpt_cached_attention"
MAX_CACHED_QUERIES = 16  # queries per sequence that `cached_attention` takes: a decode step's, not a prefill's


def build() -> pathlib.Path:
    """The kernel's shared library for this machine: compiled on first use, then taken from the cache."""
    return kernel_build.build(SOURCE)


def load() -> pathlib.Path:
    """Build the kernel and register it with XLA:CPU, once per process; returns the library's path."""
    return kernel_build.load(SOURCE, ((FORWARD_TARGET, "CausalAttentionForward"),
                                      (BACKWARD_TARGET, "CausalAttentionBackward"),
                                      (CACHED_TARGET, "CachedAttention")))


def applies(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array) -> bool:
    """The kernel's domain: CPU, float32, one key/value head per query head."""
    return (jax.default_backend() == "cpu" and q_BxLxHxK.shape == k_BxLxGxK.shape == v_BxLxGxK.shape
            and all(x.dtype == jnp.float32 for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)))


def _forward(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
             scale: float) -> tuple[jax.Array, jax.Array]:
    batch, length, heads, _ = q_BxLxHxK.shape
    out_types = (jax.ShapeDtypeStruct(q_BxLxHxK.shape, jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, length, 2), jnp.float32))
    forward = jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")
    return forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, scale: float) -> jax.Array:
    """softmax(scale·QKᵀ, causal)·V → [B, L, H, K]; call `load()` first."""
    return _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)[0]


def _causal_attention_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    o_BxLxHxK, stats_BxHxLx2 = _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)
    return o_BxLxHxK, (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, o_BxLxHxK, stats_BxHxLx2)


def _causal_attention_bwd(scale, residuals, do_BxLxHxK):
    q_BxLxHxK = residuals[0]
    out_types = (jax.ShapeDtypeStruct(q_BxLxHxK.shape, jnp.float32),) * 3
    backward = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")
    return tuple(backward(*residuals, do_BxLxHxK, scale=np.float32(scale)))


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def applies_cached(q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array) -> bool:
    """`cached_attention`'s domain: CPU, float32, at most MAX_CACHED_QUERIES queries per sequence, H query
    heads a multiple of the cache's G heads."""
    batch, queries, heads, head_dim = q_BxTxHxK.shape
    kv_heads = k_BxGxSxK.shape[1]
    return (jax.default_backend() == "cpu" and queries <= MAX_CACHED_QUERIES and k_BxGxSxK.shape == v_BxGxSxK.shape
            and k_BxGxSxK.shape[0] == batch and k_BxGxSxK.shape[3] == head_dim and heads % kv_heads == 0
            and all(x.dtype == jnp.float32 for x in (q_BxTxHxK, k_BxGxSxK, v_BxGxSxK)))


def cached_attention(q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array, q_pos_BxT: jax.Array,
                     scale: float) -> jax.Array:
    """softmax(scale·QKᵀ)·V → [B, T, H, K], query t of sequence b seeing the cache slots 0..q_pos[b, t] (slot s
    holds position s; a negative position, which the model never makes, sees none and gives zeros); not
    differentiable (`DenseAttention.extend` gives it its XLA path's gradient). Call `load()` first."""
    call = jax.ffi.ffi_call(CACHED_TARGET, jax.ShapeDtypeStruct(q_BxTxHxK.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT.astype(jnp.int32), scale=np.float32(scale))
