"""`dense`: the Cerebras-GPT reference attention (multi-head, causal, 1/sqrt(d_head), f32 softmax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import Attention, causal_attention
from cgpt_jax.model.layers import trunc_normal_param, zeros_param
from cgpt_jax.parallel.sharding import constrain


@register("dense")
class DenseAttention(Attention):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.n_heads
        k = d // h
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.scale = 1.0 / k**0.5
        param_dtype = jnp.dtype(cfg.param_dtype)
        # Q, K and V in one kernel: the same layout as GPT-2's c_attn (d → [q | k | v]).
        self.qkv_kernel = trunc_normal_param(rngs, (d, 3, h, k), cfg.init_std,
                                             ("embed", None, "heads", "head_dim"), param_dtype)
        self.qkv_bias = zeros_param((3, h, k), (None, "heads", "head_dim"), param_dtype)
        self.out_kernel = trunc_normal_param(rngs, (h, k, d), cfg.output_init_std,
                                             ("heads", "head_dim", "embed"), param_dtype)
        self.out_bias = zeros_param((d,), ("embed",), param_dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        qkv_Bx3xLxHxK = jnp.einsum("bld,dthk->btlhk", x_BxLxD.astype(dt), self.qkv_kernel[...].astype(dt))
        qkv_Bx3xLxHxK = qkv_Bx3xLxHxK + self.qkv_bias[...].astype(dt)[None, :, None]
        q, k, v = (constrain(qkv_Bx3xLxHxK[:, i], ("batch", "length", "act_heads", None)) for i in range(3))
        y_BxLxHxK = causal_attention(q, k, v, self.scale)
        y_BxLxD = jnp.einsum("blhk,hkd->bld", y_BxLxHxK, self.out_kernel[...].astype(dt))
        return y_BxLxD + self.out_bias[...].astype(dt)
