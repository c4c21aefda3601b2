"""Input pipeline: every source yields the global batch of step s as a pure function of (seed, s).

`make_dataset(data_cfg, ...)` is the one entry point the training loop calls; it returns a `Dataset`.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import jax
import ml_collections

from cgpt_jax.data.synthetic import SyntheticMarkov

Batch = dict[str, jax.Array]  # {'inputs': int32 [B, L], 'targets': int32 [B, L]}, global arrays


class Dataset(Protocol):
    vocab_size: int  # the tokenizer's vocabulary; the model's vocabulary follows it

    def train_batch(self, step: int) -> Batch:
        """The global training batch of `step`, sharded like the `sharding` given at construction."""

    def eval_batches(self) -> Iterator[Batch]:
        """A fixed set of validation batches (the same ones at every evaluation)."""

    def describe(self) -> dict:
        """What was read, for config.json and the run's logs."""


def default_data_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.source = "synthetic"  # 'synthetic' = a learnable Markov chain, for tests and smoke runs
    cfg.synthetic_vocab_size = 256
    cfg.eval_batches = 4
    return cfg


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    sharding: jax.sharding.NamedSharding,
) -> Dataset:
    if data_cfg.source == "synthetic":
        return SyntheticMarkov(
            vocab_size=data_cfg.synthetic_vocab_size,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            sharding=sharding,
            n_eval_batches=data_cfg.eval_batches,
        )
    raise ValueError(f"config.data.source={data_cfg.source!r} is not a known source; use 'synthetic'")
