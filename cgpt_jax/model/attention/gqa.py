"""`gqa(kv_heads=)`: grouped-query attention (Ainslie et al. 2023). G = kv_heads key/value heads, each
shared by n_heads / G consecutive query heads; the KV cache holds G heads instead of n_heads."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import REQUIRED
from cgpt_jax.model.attention.dense import DenseAttention
from cgpt_jax.model.layers import bias_param, project, weight_param
from cgpt_jax.parallel.sharding import constrain


@register("gqa")
class GroupedQueryAttention(DenseAttention):
    options = {"kv_heads": REQUIRED}
    examples = ({"kv_heads": 2},)

    @classmethod
    def validate(cls, model_cfg, *, kv_heads: Any) -> None:
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1:
            raise ValueError(f"kv_heads={kv_heads!r} must be a positive integer")
        if model_cfg.n_heads % kv_heads:
            divisors = [g for g in range(1, model_cfg.n_heads + 1) if model_cfg.n_heads % g == 0]
            raise ValueError(f"kv_heads={kv_heads} does not divide model.n_heads={model_cfg.n_heads}; "
                             f"use one of {divisors}")

    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        return {"kv_heads": model_cfg.n_heads}

    def init_projections(self, cfg, rngs: nnx.Rngs) -> None:
        d, h, g, k = cfg.d_model, self.n_heads, self.kv_heads, self.head_dim
        param_dtype = jnp.dtype(cfg.param_dtype)
        kv_axis = "kv_heads" if g > 1 else None  # one KV head (MQA) stays replicated
        self.q_kernel = weight_param(rngs, cfg, "attn_input", (d, h, k), ("embed", "heads", "head_dim"))
        self.q_bias = bias_param((h, k), ("heads", "head_dim"), param_dtype)
        self.kv_kernel = weight_param(rngs, cfg, "attn_input", (d, 2, g, k), ("embed", None, kv_axis, "head_dim"))
        self.kv_bias = bias_param((2, g, k), (None, kv_axis, "head_dim"), param_dtype)
        self.out_kernel = weight_param(rngs, cfg, "attn_output", (h, k, d), ("heads", "head_dim", "embed"))
        self.out_bias = bias_param((d,), ("embed",), param_dtype)

    def project(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = self.compute_dtype
        batch, length, _ = x_BxTxD.shape
        h, g, k = self.n_heads, self.kv_heads, self.head_dim
        q_BxTxHxK = project(x_BxTxD, self.q_kernel, dt).reshape(batch, length, h, k) + self.q_bias[...].astype(dt)
        q_BxTxHxK = constrain(q_BxTxHxK, ("batch", "length", "act_heads", None))
        kv_BxTx2xGxK = project(x_BxTxD, self.kv_kernel, dt).reshape(batch, length, 2, g, k)
        kv_BxTx2xGxK = kv_BxTx2xGxK + self.kv_bias[...].astype(dt)
        kv_axes = ("batch", "length", "act_heads" if g > 1 else None, None)
        return q_BxTxHxK, constrain(kv_BxTx2xGxK[:, :, 0], kv_axes), constrain(kv_BxTx2xGxK[:, :, 1], kv_axes)

    def params_from_dense(self, dense: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Mean-pool each group's key and value heads (the GQA paper's uptraining init); exact when
        kv_heads = n_heads."""
        def pool(x_Nx2xHxK: jax.Array) -> jax.Array:
            *lead, two, h, k = x_Nx2xHxK.shape
            return x_Nx2xHxK.reshape(*lead, two, self.kv_heads, h // self.kv_heads, k).mean(-2)
        qkv, bias = dense["qkv_kernel"], dense["qkv_bias"]
        return {"q_kernel": qkv[..., 0, :, :], "q_bias": bias[..., 0, :, :],
                "kv_kernel": pool(qkv[..., 1:, :, :]), "kv_bias": pool(bias[..., 1:, :, :]),
                "out_kernel": dense["out_kernel"], "out_bias": dense["out_bias"]}
