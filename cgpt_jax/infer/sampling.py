"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with per-row seeds."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

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


def filter_logits(logits_BxV: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus): dropped tokens get -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the shortest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        kept_B = jnp.sum(jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampling.top_p, axis=-1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def greedy(logits_BxV: jax.Array) -> jax.Array:
    """jnp.argmax over the vocabulary (the first of equal maxima; the first NaN where there is one), int32 [B],
    as a max and then the lowest id that reaches it: two plain reductions, which XLA:CPU vectorises where
    its argmax (one reduction over value-index pairs) runs element by element (docs/performance.md)."""
    best_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    nan_BxV = jnp.isnan(logits_BxV)  # apart: XLA:CPU's max may pass over a NaN
    reaches_BxV = jnp.where(jnp.any(nan_BxV, axis=-1, keepdims=True), nan_BxV, logits_BxV == best_Bx1)
    ids_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(reaches_BxV, ids_V, logits_BxV.shape[-1] - 1), axis=-1)


def choose(logits_BxV: jax.Array, seeds_B: jax.Array, index: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row, int32 [B].

    Row b draws with key fold_in(key(seeds_B[b]), index): its choice depends only on its own logits, seed
    and the position `index` in its continuation, never on the other rows of the batch.
    """
    if sampling.temperature == 0.0:
        return greedy(logits_BxV)
    logits_BxV = filter_logits(logits_BxV, sampling)
    keys_B = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), index))(seeds_B)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)
