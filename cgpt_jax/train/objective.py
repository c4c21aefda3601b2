"""What a run trains: the model it builds, the batch it reads and the loss it minimises.

Pretraining is `LanguageModeling`. A fine-tuning objective (a classifier on the decoder, ...) is another
subclass, and `train/setup.py:build_run(config, mesh, objective=...)` sets it up exactly as it sets up
pretraining: the same mesh, optimizer with its guard, sharded state and jitted steps.
"""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax.model import GPT
from cgpt_jax.parallel.sharding import LogicalArray

Batch = dict[str, jax.Array]


class Objective(abc.ABC):
    """The interface `build_run` uses; subclasses define all three methods."""

    @abc.abstractmethod
    def make_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        """The model whose parameters train (created inside `jax.eval_shape` and a jitted initialiser)."""

    @abc.abstractmethod
    def batch_layout(self, config: ml_collections.ConfigDict) -> dict[str, LogicalArray]:
        """Each array of one global batch: shape, dtype and logical axes (which shard it)."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Batch) -> jax.Array:
        """The mean loss of `batch`, a float32 scalar (equal-sized micro-batches average to the batch's)."""


class LanguageModeling(Objective):
    """Pretraining: the GPT decoder and mean next-token cross-entropy (nats) over every token."""

    def make_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        return GPT(config.model, rngs=rngs)

    def batch_layout(self, config: ml_collections.ConfigDict) -> dict[str, LogicalArray]:
        tokens = LogicalArray((config.train.global_batch_size, config.train.seq_len), jnp.int32, ("batch", "length"))
        return {"inputs": tokens, "targets": tokens}

    def loss(self, model: nnx.Module, batch: Batch) -> jax.Array:
        logits_BxLxV = model(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"]).mean()


LANGUAGE_MODELING = LanguageModeling()
