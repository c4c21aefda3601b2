"""`fused`: the platform's fused attention kernel for the causal training pass, equal to `dense` to
float32 rounding.

- GPU, bfloat16/float16: cuDNN's flash-attention kernel (`jax.nn.dot_product_attention`).
- CPU, float32: cgpt_jax's C++ kernel (`cgpt_jax/kernels/cpu_attention.py`), compiled for the machine
  on first use; where it cannot be built (no C++ compiler), a warning says why and JAX's XLA
  implementation runs instead.
- Everything else (TPU, other dtypes, decode steps with a cache mask, grouped key/value heads on CPU, a
  batch or head count that the mesh does not divide):
  `jax.nn.dot_product_attention`'s XLA implementation, which keeps logits and softmax in float32 like
  `dense`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import softmax_core
from cgpt_jax.model.attention.dense import DenseAttention, causal_attention_on_cpu


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

    @softmax_core
    def mix(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
            q_pos_BxT: jax.Array | None, k_pos_S: jax.Array | None) -> jax.Array:
        # The training pass with the plain causal mask needs no mask array: the kernels skip masked tiles.
        plain_causal = q_pos_BxT is None and type(self).visible is DenseAttention.visible
        if q_pos_BxT is None:
            q_pos_BxT, k_pos_S = jnp.arange(q_BxTxHxK.shape[1])[None], jnp.arange(k_BxSxGxK.shape[1])
        bias = self.score_bias(q_pos_BxT, k_pos_S)
        if plain_causal and bias is None:
            y_BxTxHxK = causal_attention_on_cpu(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, self.scale)
            if y_BxTxHxK is not None:
                return y_BxTxHxK
        mask = None if plain_causal else self.visible(q_pos_BxT, k_pos_S)[:, None]
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, bias=bias, mask=mask,
                                            scale=self.scale, is_causal=plain_causal,
                                            implementation=_implementation(q_BxTxHxK, plain_causal))
