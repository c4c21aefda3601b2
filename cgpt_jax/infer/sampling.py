"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with per-row seeds.

The settings are traced values, never compiled in: one program serves every `Sampling`, and each row of a
batch may have its own settings (`choose_rows`: a server's slots serve different requests). Sorting the
vocabulary runs only when some row filters, and drawing only when some row is not greedy (`lax.cond`:
both branches are compiled once).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off. A pytree
    of its three settings, which a jitted program takes as traced scalars."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, vocab_size: int) -> None:
        errors = []
        if not self.temperature >= 0.0:
            errors.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 <= self.top_k <= vocab_size:
            errors.append(f"top_k={self.top_k} must be in [0, vocab_size={vocab_size}] (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.temperature == 0.0 and (self.top_k or self.top_p < 1.0):
            errors.append("top_k / top_p need temperature > 0 (temperature 0 is greedy)")
        if errors:
            raise ValueError("invalid sampling settings: " + "; ".join(errors))

    def traced(self) -> Sampling:
        """The settings as float32 / int32 scalars, so that every `Sampling` meets one compiled program."""
        return Sampling(np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p))


def greedy(logits_BxV: jax.Array) -> jax.Array:
    """jnp.argmax over the vocabulary (the first of equal maxima; the first NaN where there is one), int32 [B],
    as a max and then the lowest id that reaches it: two plain reductions, which XLA:CPU vectorises where
    its argmax (one reduction over value-index pairs) runs element by element (docs/performance.md)."""
    best_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    nan_BxV = jnp.isnan(logits_BxV)  # apart: XLA:CPU's max may pass over a NaN
    reaches_BxV = jnp.where(jnp.any(nan_BxV, axis=-1, keepdims=True), nan_BxV, logits_BxV == best_Bx1)
    ids_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(reaches_BxV, ids_V, logits_BxV.shape[-1] - 1), axis=-1)


def filter_logits(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array
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
        filtered_BxV = filter_logits(logits_BxV, temperature_B, top_k_B, top_p_B)
        keys_B = jax.vmap(lambda seed, index: jax.random.fold_in(jax.random.key(seed), index))(seeds_B, index_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
        return jnp.where(temperature_B > 0, drawn_B, greedy_B)

    token_B = jax.lax.cond(jnp.any(temperature_B > 0), sample, lambda: greedy_B)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return token_B, jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]


def choose(logits_BxV: jax.Array, seeds_B: jax.Array, index: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row, int32 [B], all rows with the same settings (`choose_rows`).

    Row b draws with key fold_in(key(seeds_B[b]), index): its choice depends only on its own logits, seed
    and the position `index` in its continuation, never on the other rows of the batch.
    """
    rows = lambda value, dtype: jnp.full(logits_BxV.shape[:1], value, dtype)
    return choose_rows(logits_BxV, rows(sampling.temperature, jnp.float32), rows(sampling.top_k, jnp.int32),
                       rows(sampling.top_p, jnp.float32), seeds_B, rows(index, jnp.int32))[0]
