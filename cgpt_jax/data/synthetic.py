"""A clearly synthetic, learnable token source for tests and smoke runs.

Each sequence follows a fixed random permutation (token t is followed by perm[t]) except that one token
in eight is replaced by a uniformly random one. A model that learns the permutation reaches a loss of
about (1/8)·ln(V) + H(1/8); a model that learns nothing stays at ln(V).
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from cgpt_jax.data.assemble import global_batch, process_rows

NOISE_RATE = 1 / 8
_EVAL_STEP_OFFSET = 1 << 40  # eval rows live in a step range training never reaches


class SyntheticMarkov:
    def __init__(self, *, vocab_size: int, seq_len: int, global_batch_size: int, seed: int,
                 sharding: jax.sharding.NamedSharding, n_eval_batches: int):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.sharding = sharding
        self.n_eval_batches = n_eval_batches
        self.perm = np.random.default_rng([seed, 0]).permutation(vocab_size)

    def _row(self, step: int, row: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, step, row])
        tokens = np.empty(self.seq_len + 1, np.int32)
        tokens[0] = rng.integers(self.vocab_size)
        noise = rng.random(self.seq_len) < NOISE_RATE
        random_tokens = rng.integers(self.vocab_size, size=self.seq_len)
        for i in range(self.seq_len):
            tokens[i + 1] = random_tokens[i] if noise[i] else self.perm[tokens[i]]
        return tokens

    def _global_batch(self, step: int) -> dict[str, jax.Array]:
        # Only the rows of this process's shards are ever generated.
        lo, hi = process_rows(self.sharding, self.global_batch_size, self.seq_len)
        rows = np.stack([self._row(step, r) for r in range(lo, hi)])
        return global_batch(rows, lo, self.global_batch_size, self.sharding)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        return self._global_batch(step)

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        for i in range(self.n_eval_batches):
            yield self._global_batch(_EVAL_STEP_OFFSET + i)

    def describe(self) -> dict:
        return {"source": "synthetic", "vocab_size": self.vocab_size, "noise_rate": NOISE_RATE}
