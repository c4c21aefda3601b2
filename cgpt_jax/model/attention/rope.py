"""`rope(theta=)`: rotary position embeddings (Su et al. 2021), in the rotate-half layout of GPT-NeoX /
Llama: the two halves of each head's query and key are rotated as complex pairs by position·θ^(-2i/K).
Positions enter only here, so the model has no learned position table."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.dense import DenseAttention


def rotate_half(x_BxTxNxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotate (x[:K/2], x[K/2:]) by angle position·θ^(-2i/K), computed in float32 (or wider)."""
    half = x_BxTxNxK.shape[-1] // 2
    dtype = jnp.promote_types(x_BxTxNxK.dtype, jnp.float32)
    inv_freq_F = theta ** (-jnp.arange(half, dtype=dtype) / half)
    angle_BxTx1xF = (positions_BxT.astype(dtype)[..., None] * inv_freq_F)[:, :, None, :]
    cos, sin = jnp.cos(angle_BxTx1xF), jnp.sin(angle_BxTx1xF)
    x1, x2 = x_BxTxNxK[..., :half].astype(dtype), x_BxTxNxK[..., half:].astype(dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxK.dtype)


@register("rope")
class RotaryAttention(DenseAttention):
    options = {"theta": 10000.0}
    learned_positions = False

    @classmethod
    def validate(cls, model_cfg, *, theta: Any) -> None:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
            raise ValueError(f"theta={theta!r} must be a number > 1 (the usual base is 10000.0)")
        head_dim = model_cfg.d_model // model_cfg.n_heads
        if head_dim % 2:
            raise ValueError(f"rope rotates pairs of dimensions, but the head dimension d_model / n_heads "
                             f"= {head_dim} is odd; change model.d_model or model.n_heads")

    def rotate(self, q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array,
               positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (rotate_half(q_BxTxHxK, positions_BxT, self.theta),
                rotate_half(k_BxTxGxK, positions_BxT, self.theta))
