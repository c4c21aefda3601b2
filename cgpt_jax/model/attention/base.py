"""The contract every attention variant fulfils, and the numerical cores the variants share.

A variant is an `Attention` subclass registered under a name (see `__init__.py`). GPT uses it through
three calls, so a variant works for training, FLOP counting, sharding and generation at once:

    attn(x_BxLxD) -> y_BxLxD
        Training / full forward over positions 0..L-1, causal; the residual-branch output (output
        projection and its bias included).
    attn.cache_layout(batch_size, max_len) -> {name: CacheSpec}
        The per-layer decode cache: shape, dtype and logical axes of each array (heads on 'kv_heads',
        so the cache shards by heads under the same rules as the parameters).
    attn.extend(x_BxTxD, cache, start_B) -> (y_BxTxD, cache)
        Single-step decode and (chunked) prefill in one call: sequence b holds start_B[b] tokens in
        `cache`; its T new tokens sit at positions start_B[b] + 0..T-1. Their keys/values are written
        into the cache, every new token attends to cache slots at positions <= its own, and the updated
        cache is returned. Prefill is extend(prompt, empty cache, zeros); a decode step is T = 1.
        Sequences of one batch may sit at different positions (right-padded prompts: slots past a
        sequence's own position are never read, and are overwritten as it advances).
        Slots start_B[b] + T must fit in the cache; write positions past its end are clamped by XLA.

A variant also declares, as class attributes and classmethods that need no model instance:
`options` (its config-string arguments and defaults), `learned_positions`, `supports_decode`,
`validate(model_cfg, **options)` (ValueError at config time) and `fwd_flops_per_token(model_cfg,
seq_len, **options)` for the one FLOP count (cgpt_jax/flops.py). FLOP convention: count the
attention-score entries a variant evaluates, masked or not, as the Cerebras count does for dense
attention (its full S×S square): 2·K FLOPs for each query-key score and 2·K for each weighted value, per head.
The count is the model's: an implementation that skips entries masked for every query of a chunk (dense's
`causal_mix`) still declares them, so that MFU and compute budgets do not depend on the kernel.

Parameterization (cgpt_jax/model/parameterization.py): a variant scales its attention logits by
`attention_scale(model_cfg)` (1/sqrt(d_head), or 1/d_head under muP), and every parameter it creates
declares its group as `nnx.Param` metadata, which sets its init std, muP learning rate and weight decay:
`layers.weight_param(rngs, cfg, "attn_input", shape, axes)` for a matrix, `layers.bias_param` for a
bias, `nnx.Param(value, logical_axes=..., param_group="vector")` for a gain or per-head scalar (the
default for a parameter of one dimension that declares nothing). Subclasses of `DenseAttention` inherit
its scale and its declared projections.

The conformance suite (tests/test_attention_conformance.py) reads `examples` (options that fit its tiny
model: 4 heads of 8 dims, 16 positions) and `dense_equal_options` (where the variant equals `dense`).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.parallel.sharding import LogicalArray


class _Required:
    def __repr__(self) -> str:
        return "?"


REQUIRED: Any = _Required()  # an option without a default: the config string must give it

Cache = dict[str, jax.Array]


CacheSpec = LogicalArray  # one array of a decode cache: shape, dtype and logical axes


class Attention(nnx.Module):
    """Interface of an attention variant; `dense.DenseAttention` is the reference implementation and
    the class to subclass when a variant changes one step of it."""

    options: ClassVar[dict[str, Any]] = {}  # config-string arguments -> default (REQUIRED: none)
    learned_positions: ClassVar[bool] = True  # False: the model has no position table (RoPE, ALiBi)
    supports_decode: ClassVar[bool] = True  # `extend` gives the same outputs as `__call__`
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # Combined ("a+b") variants are built from subclasses of DenseAttention, see `__init__.py`.

    @classmethod
    def validate(cls, model_cfg, **options) -> None:
        """Raise ValueError naming the field and the fix when the variant cannot serve `model_cfg`."""

    @classmethod
    def fwd_flops_per_token(cls, model_cfg, seq_len: int, **options) -> float:
        """Forward mixing FLOPs per token and layer (QKᵀ and AV), projections excluded: dense
        attention evaluates the full S×S square, 2·S·d FLOPs for each product."""
        return 4.0 * seq_len * model_cfg.d_model

    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        """Options under which this variant computes exactly what `dense` computes on `model_cfg` at
        `seq_len`, or None when it never does. A variant returning options also provides
        `params_from_dense(dense_params) -> params` (DenseAttention's subclasses inherit one)."""
        return None

    # The three calls of the module docstring; a variant must define all of them.
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define __call__")

    def cache_layout(self, batch_size: int, max_len: int) -> dict[str, CacheSpec]:
        raise NotImplementedError(f"{type(self).__name__} must define cache_layout")

    def extend(self, x_BxTxD: jax.Array, cache: Cache, start_B: jax.Array) -> tuple[jax.Array, Cache]:
        raise NotImplementedError(f"{type(self).__name__} must define extend")

    def prefill(self, x_BxTxD: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """`extend` from an empty cache at positions 0..T-1; a variant may compute it faster."""
        return self.extend(x_BxTxD, cache, jnp.zeros((x_BxTxD.shape[0],), jnp.int32))

    def decode_rows(self, cache_len: int) -> int:
        """The fewest rows a decode step over a cache of `cache_len` positions should run (the generator pads
        a smaller batch with rows it never reads). 2 unless a variant knows better: with one row XLA:CPU
        lays the cache out anew for the attention's products and copies it every step."""
        return 2


def softmax_core(mix: Callable) -> Callable:
    """Declares a variant's `mix` plain softmax attention, however it computes it, so that the variant's
    decode steps may attend over the cache through the CPU kernel instead (`DenseAttention.extend`). A
    `mix` that changes the computation leaves it off (and must not copy it from another `mix`, as
    `functools.wraps` would)."""
    mix.softmax_core = True
    return mix


# --- shared numerical cores ---------------------------------------------------------------------------
# Query head h uses key/value head h // (H / G): consecutive query heads share a KV head, as in
# jax.nn.dot_product_attention. With G = H this is plain multi-head attention.

def scores(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, scale: float) -> jax.Array:
    """scale · QKᵀ per head, in float32 (or wider, for float64 gradient checks)."""
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    wide = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
    if g == 1:  # one KV head: no head axis in the product, or XLA:CPU lays a decode cache out anew for it
        logits_BxHxTxS = jnp.einsum("bthk,bsk->bhts", q_BxTxHxK, k_BxSxGxK[:, :, 0], preferred_element_type=wide)
        return logits_BxHxTxS * scale
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
    logits_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=wide)
    return logits_BxGxRxTxS.reshape(b, h, t, -1) * scale


def weighted_values(probs_BxHxTxS: jax.Array, v_BxSxGxK: jax.Array) -> jax.Array:
    """Σ_s probs · V per head → [B, T, H, K]."""
    b, h, t, s = probs_BxHxTxS.shape
    g = v_BxSxGxK.shape[2]
    if g == 1:  # as in `scores`
        return jnp.einsum("bhts,bsk->bthk", probs_BxHxTxS, v_BxSxGxK[:, :, 0])
    probs_BxGxRxTxS = probs_BxHxTxS.reshape(b, g, h // g, t, s)
    y_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxSxGxK)
    return y_BxTxGxRxK.reshape(b, t, h, -1)


def attend(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, visible_BxTxS: jax.Array,
           bias_BxHxTxS: jax.Array | None, scale: float) -> jax.Array:
    """softmax(scale·QKᵀ + bias, over visible keys)·V with logits and softmax in float32.

    `visible` and `bias` broadcast from a leading size-1 batch (and head) axis.
    """
    logits_BxHxTxS = scores(q_BxTxHxK, k_BxSxGxK, scale)
    if bias_BxHxTxS is not None:
        logits_BxHxTxS = logits_BxHxTxS + bias_BxHxTxS
    logits_BxHxTxS = jnp.where(visible_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxSxGxK.dtype)
    return weighted_values(probs_BxHxTxS, v_BxSxGxK)


def write_cache(cache_BxGxSxK: jax.Array, new_BxTxGxK: jax.Array, start_B: jax.Array | int) -> jax.Array:
    """Write each sequence's T new entries at slots start_B[b] .. start_B[b] + T - 1 of a head-major cache;
    an int start is every sequence's (one slice update where per-sequence starts are a scatter)."""
    new_BxGxTxK = jnp.swapaxes(new_BxTxGxK, 1, 2).astype(cache_BxGxSxK.dtype)
    if isinstance(start_B, int):
        return jax.lax.dynamic_update_slice_in_dim(cache_BxGxSxK, new_BxGxTxK, start_B, axis=2)

    def one(cache_GxSxK: jax.Array, new_GxTxK: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(cache_GxSxK, new_GxTxK, start, axis=1)
    return jax.vmap(one)(cache_BxGxSxK, new_BxGxTxK, start_B)
