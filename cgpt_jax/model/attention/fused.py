"""`fused`: `jax.nn.dot_product_attention`. On GPU in bfloat16/float16 the causal training pass runs
cuDNN's fused flash-attention kernel; elsewhere (CPU, TPU, float32, decode steps with a cache mask) it
runs JAX's XLA implementation, which keeps the logits and softmax in float32 like `dense`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.dense import DenseAttention


def _implementation(q_BxTxHxK: jax.Array, causal_self_attention: bool) -> str:
    """cuDNN where it applies: GPU, half precision, head dims it supports, plain causal mask."""
    head_dim = q_BxTxHxK.shape[-1]
    on_gpu = jax.default_backend() == "gpu"
    half = q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 and causal_self_attention else "xla"


@register("fused")
class FusedAttention(DenseAttention):
    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        return {}

    def mix(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
            q_pos_BxT: jax.Array | None, k_pos_S: jax.Array | None) -> jax.Array:
        # The training pass with the plain causal mask needs no mask array: cuDNN skips masked tiles.
        plain_causal = q_pos_BxT is None and type(self).visible is DenseAttention.visible
        if q_pos_BxT is None:
            q_pos_BxT, k_pos_S = jnp.arange(q_BxTxHxK.shape[1])[None], jnp.arange(k_BxSxGxK.shape[1])
        bias = self.score_bias(q_pos_BxT, k_pos_S)
        mask = None if plain_causal else self.visible(q_pos_BxT, k_pos_S)[:, None]
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, bias=bias, mask=mask,
                                            scale=self.scale, is_causal=plain_causal,
                                            implementation=_implementation(q_BxTxHxK, plain_causal))
