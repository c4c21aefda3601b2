"""`sliding_window(window=)`: each token attends to itself and the window - 1 tokens before it
(Beltagy et al. 2020; Mistral). Training computes a band instead of the full square: the sequence is cut
into chunks of `window` tokens and each chunk attends to itself and the chunk before it, so the cost
grows as L·window, not L². Decoding reads the whole cache with the window as a mask."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import REQUIRED, attend
from cgpt_jax.model.attention.dense import DenseAttention


def _banded(seq_len: int, window: int) -> bool:
    """Two chunks of keys per query beat the full square only when 2·window < L."""
    return 2 * window < seq_len


@register("sliding_window")
class SlidingWindowAttention(DenseAttention):
    options = {"window": REQUIRED}
    examples = ({"window": 3},)  # banded, and 3 does not divide the suite's 16 positions: padding

    @classmethod
    def validate(cls, model_cfg, *, window: Any) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an integer >= 1 (tokens a query sees, itself "
                             f"included)")

    @classmethod
    def fwd_flops_per_token(cls, model_cfg, seq_len: int, *, window: int) -> float:
        if not _banded(seq_len, window):
            return 4.0 * seq_len * model_cfg.d_model
        padded = math.ceil(seq_len / window) * window  # each of these queries scores 2·window keys
        return 4.0 * 2 * window * model_cfg.d_model * padded / seq_len

    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        return {"window": seq_len}

    def visible(self, q_pos_BxT: jax.Array, k_pos_S: jax.Array) -> jax.Array:
        distance_BxTxS = q_pos_BxT[:, :, None] - k_pos_S[None, None, :]
        return (distance_BxTxS >= 0) & (distance_BxTxS < self.window)

    def mix(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
            q_pos_BxT: jax.Array | None, k_pos_S: jax.Array | None) -> jax.Array:
        length, w = q_BxTxHxK.shape[1], self.window
        if q_pos_BxT is not None or not _banded(length, w):
            return super().mix(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_pos_BxT, k_pos_S)
        n = -(-length // w)

        def chunks(x_BxLxNxK: jax.Array) -> jax.Array:
            x_BxLxNxK = jnp.pad(x_BxLxNxK, ((0, 0), (0, n * w - length), (0, 0), (0, 0)))
            return x_BxLxNxK.reshape(x_BxLxNxK.shape[0], n, w, *x_BxLxNxK.shape[2:])

        def with_previous(x_BxCxWxGxK: jax.Array) -> jax.Array:
            previous = jnp.pad(x_BxCxWxGxK[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
            return jnp.concatenate([previous, x_BxCxWxGxK], axis=2)  # [B, C, 2W, G, K]

        q_pos_CxW = jnp.arange(n * w).reshape(n, w)
        k_pos_Cx2W = jnp.concatenate([q_pos_CxW - w, q_pos_CxW], axis=1)  # chunk 0's "previous" is < 0

        def one_chunk(q_BxWxHxK, k_Bx2WxGxK, v_Bx2WxGxK, q_pos_W, k_pos_2W):
            q_pos_1xW = q_pos_W[None]
            visible = self.visible(q_pos_1xW, k_pos_2W) & (k_pos_2W >= 0)
            return attend(q_BxWxHxK, k_Bx2WxGxK, v_Bx2WxGxK, visible, self.score_bias(q_pos_1xW, k_pos_2W),
                          self.scale)

        y_BxCxWxHxK = jax.vmap(one_chunk, in_axes=(1, 1, 1, 0, 0), out_axes=1)(
            chunks(q_BxTxHxK), with_previous(chunks(k_BxSxGxK)), with_previous(chunks(v_BxSxGxK)),
            q_pos_CxW, k_pos_Cx2W)
        return y_BxCxWxHxK.reshape(y_BxCxWxHxK.shape[0], n * w, *y_BxCxWxHxK.shape[3:])[:, :length]
