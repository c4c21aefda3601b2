"""Next-token choice with each row's own sampling settings, for a decode batch whose slots serve different
requests.

`cgpt_jax.infer.sampling.choose` takes one static `Sampling` for the whole batch; here temperature, top_k,
top_p, seed and continuation index are arrays, one entry per row. The choice of a row equals `choose`'s
for that row's settings: the same filtered logits (temperature, then top-k, then top-p, with the same
thresholds) and the same key fold_in(key(seed), index), so a served request samples what
`python -m cgpt_jax.generate --seed=S` samples. Sorting the vocabulary runs only when some row filters,
and sampling only when some row is not greedy (`lax.cond`: both branches are compiled once).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cgpt_jax.infer.sampling import greedy


def _filtered(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
              ) -> jax.Array:
    """Temperature, top-k (0: off) and top-p (1: off) per row: dropped tokens get -inf."""
    vocab = logits_BxV.shape[-1]
    safe_temperature_B = jnp.where(temperature_B > 0, temperature_B, 1.0)  # greedy rows are not sampled
    logits_BxV = logits_BxV.astype(jnp.float32) / safe_temperature_B[:, None]

    def top_k_then_p(logits_BxV: jax.Array) -> jax.Array:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        k_B = jnp.where(top_k_B > 0, top_k_B, vocab)
        kth_Bx1 = jnp.take_along_axis(sorted_BxV, k_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
        # Dropping values below a threshold keeps the sorted order: the sort of the top-k-filtered logits.
        sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, -jnp.inf, sorted_BxV)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        kept_B = jnp.sum(jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p_B[:, None], axis=-1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
        nucleus_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
        return jnp.where((top_p_B < 1.0)[:, None], nucleus_BxV, logits_BxV)

    filters = jnp.any((top_k_B > 0) | (top_p_B < 1.0))
    return jax.lax.cond(filters, top_k_then_p, lambda logits: logits, logits_BxV)


def choose_rows(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
                seeds_B: jax.Array, index_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next token int32 [B], its log-probability under the model's distribution float32 [B]).

    A row with temperature 0 is greedy (its top_k / top_p are ignored); the others draw with key
    fold_in(key(seeds_B[b]), index_B[b]).
    """
    greedy_B = greedy(logits_BxV)

    def sample() -> jax.Array:
        filtered_BxV = _filtered(logits_BxV, temperature_B, top_k_B, top_p_B)
        keys_B = jax.vmap(lambda seed, index: jax.random.fold_in(jax.random.key(seed), index))(seeds_B, index_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
        return jnp.where(temperature_B > 0, drawn_B, greedy_B)

    token_B = jax.lax.cond(jnp.any(temperature_B > 0), sample, lambda: greedy_B)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return token_B, jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
