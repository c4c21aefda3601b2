"""`alibi`: attention with linear biases (Press et al. 2022). Head h adds -m_h·(distance to the key)
to its logits, with geometric slopes m_h; no position embeddings at all."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.dense import DenseAttention


def alibi_slopes(n_heads: int) -> tuple[float, ...]:
    """2^(-8h/n) for h = 1..n when n is a power of two; otherwise those of the next lower power of two
    followed by every other slope of the next higher one (the paper's reference code)."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    if math.log2(n_heads).is_integer():
        return tuple(power_of_two(n_heads))
    lower = 2 ** math.floor(math.log2(n_heads))
    return tuple(power_of_two(lower) + power_of_two(2 * lower)[0::2][:n_heads - lower])


@register("alibi")
class ALiBiAttention(DenseAttention):
    learned_positions = False

    def score_bias(self, q_pos_BxT: jax.Array, k_pos_S: jax.Array) -> jax.Array:
        slopes_H = jnp.asarray(alibi_slopes(self.n_heads), jnp.float32)
        distance_BxTxS = (q_pos_BxT[:, :, None] - k_pos_S[None, None, :]).astype(jnp.float32)
        return -slopes_H[None, :, None, None] * distance_BxTxS[:, None]
