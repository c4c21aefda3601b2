"""What every attention variant provides, and the causal softmax core they share."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Attention(nnx.Module):
    """Base class of attention variants. A subclass's ``__call__(x_BxLxD) -> y_BxLxD`` is the
    residual-branch output, output projection and its bias included.

    A subclass sets `learned_positions` (False for variants that encode position themselves, e.g. RoPE),
    may check its arguments against the model in `validate`, and declares its forward mixing FLOPs per
    token and layer in `fwd_flops_per_token` for the one FLOP count (cgpt_jax/flops.py).
    """

    variant_name: str = ""
    learned_positions: bool = True

    @classmethod
    def validate(cls, model_cfg, **kwargs) -> None:
        """Raise ValueError naming the field and the fix when the variant cannot serve `model_cfg`."""

    @classmethod
    def fwd_flops_per_token(cls, model_cfg, seq_len: int, **kwargs) -> float:
        """QKᵀ and AV over the full S×S square: 2·S·d each (the Cerebras convention ignores causality)."""
        return 4.0 * seq_len * model_cfg.d_model


def causal_attention(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                     scale: float) -> jax.Array:
    """Softmax(scale·QKᵀ + causal mask)·V with the logits and softmax in float32."""
    logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32) * scale
    length, source = logits_BxHxLxS.shape[-2:]
    causal_LxS = jnp.arange(length)[:, None] >= jnp.arange(source)[None, :]
    logits_BxHxLxS = jnp.where(causal_LxS, logits_BxHxLxS, jnp.finfo(jnp.float32).min)
    probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS, v_BxSxHxK)
