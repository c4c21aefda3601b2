"""`blockwise(block=)`: memory-efficient attention (Rabe & Staats 2021; the online softmax of
FlashAttention). Keys and values are visited in blocks of `block` positions with a running maximum,
normaliser and weighted sum, so no [T, S] logit matrix is ever formed: forward memory is O(T·block) per
head, and the backward pass recomputes each block instead of storing it. Equal to dense attention."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import scores, softmax_core, weighted_values
from cgpt_jax.model.attention.dense import DenseAttention


@register("blockwise")
class BlockwiseAttention(DenseAttention):
    options = {"block": 128}
    examples = ({"block": 5},)  # 5 does not divide the suite's 16 positions: padding

    @classmethod
    def validate(cls, model_cfg, *, block: Any) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block={block!r} must be an integer >= 1 (key positions per block)")

    @classmethod
    def fwd_flops_per_token(cls, model_cfg, seq_len: int, *, block: int) -> float:
        return 4.0 * math.ceil(seq_len / block) * block * model_cfg.d_model  # padded to whole blocks

    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        return {"block": max(1, seq_len // 3)}  # several blocks, the last one padded

    @softmax_core
    def mix(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
            q_pos_BxT: jax.Array | None, k_pos_S: jax.Array | None) -> jax.Array:
        batch, length, heads, head_dim = q_BxTxHxK.shape
        source, block = k_BxSxGxK.shape[1], self.block
        if q_pos_BxT is None:
            q_pos_BxT, k_pos_S = jnp.arange(length)[None], jnp.arange(source)
        n = -(-source // block)
        pad = n * block - source
        # Padded keys get position -1: "no key", invisible whatever `visible` says.
        k_pos_NxC = jnp.pad(k_pos_S, (0, pad), constant_values=-1).reshape(n, block)

        def blocks(x_BxSxGxK: jax.Array) -> jax.Array:
            x_BxSxGxK = jnp.pad(x_BxSxGxK, ((0, 0), (0, pad), (0, 0), (0, 0)))
            return x_BxSxGxK.reshape(batch, n, block, *x_BxSxGxK.shape[2:]).swapaxes(0, 1)

        acc_dtype = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
        lowest = jnp.finfo(jnp.float32).min

        @jax.checkpoint  # recompute a block's logits in the backward pass instead of storing them all
        def visit(carry, xs):
            max_BxHxT, norm_BxHxT, acc_BxTxHxK = carry
            k_BxCxGxK, v_BxCxGxK, k_pos_C = xs
            logits_BxHxTxC = scores(q_BxTxHxK, k_BxCxGxK, self.scale)
            bias = self.score_bias(q_pos_BxT, k_pos_C)
            if bias is not None:
                logits_BxHxTxC = logits_BxHxTxC + bias
            visible_BxTxC = self.visible(q_pos_BxT, k_pos_C) & (k_pos_C >= 0)
            logits_BxHxTxC = jnp.where(visible_BxTxC[:, None], logits_BxHxTxC, lowest)
            new_max_BxHxT = jnp.maximum(max_BxHxT, logits_BxHxTxC.max(-1))
            probs_BxHxTxC = jnp.where(visible_BxTxC[:, None],
                                      jnp.exp(logits_BxHxTxC - new_max_BxHxT[..., None]), 0.0)
            correction_BxHxT = jnp.exp(max_BxHxT - new_max_BxHxT)
            norm_BxHxT = norm_BxHxT * correction_BxHxT + probs_BxHxTxC.sum(-1)
            acc_BxTxHxK = (acc_BxTxHxK * correction_BxHxT.transpose(0, 2, 1)[..., None]
                           + weighted_values(probs_BxHxTxC.astype(v_BxCxGxK.dtype), v_BxCxGxK).astype(acc_dtype))
            return (new_max_BxHxT, norm_BxHxT, acc_BxTxHxK), None

        init = (jnp.full((batch, heads, length), lowest, acc_dtype), jnp.zeros((batch, heads, length), acc_dtype),
                jnp.zeros((batch, length, heads, head_dim), acc_dtype))
        (_, norm_BxHxT, acc_BxTxHxK), _ = jax.lax.scan(visit, init, (blocks(k_BxSxGxK), blocks(v_BxSxGxK), k_pos_NxC))
        return (acc_BxTxHxK / norm_BxHxT.transpose(0, 2, 1)[..., None]).astype(v_BxSxGxK.dtype)
