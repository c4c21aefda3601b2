"""Classification as an `Objective`, so `train/setup.py:build_run` sets it up like pretraining.

Batch: inputs [B, L] int32 right-padded token ids (L: max_len, or the batch's length bucket), lengths [B]
int32 (real tokens per row), labels [B] int32 class ids, or for multi-label data [B, C] int32 0/1 (which
classes each text has). Losses (`finetune.loss`): 'softmax' cross-entropy over the classes (single-label),
or 'sigmoid': binary cross-entropy of each class against the one-hot (multi-label: the 0/1) target,
averaged over classes (the one-vs-rest form; for two classes the binary classifier's formula).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.parallel.sharding import LogicalArray
from cgpt_jax.train.objective import Batch, Objective

from cgpt_jax.finetune.settings import LOSSES


def classification_loss(logits_BxC: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
    """Per-row loss [B] of float32 class logits against class ids [B] or multi-label 0/1 [B, C]."""
    if labels.ndim == 2:
        return optax.sigmoid_binary_cross_entropy(logits_BxC, labels.astype(logits_BxC.dtype)).mean(-1)
    if loss == "softmax":
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels)
    targets_BxC = jax.nn.one_hot(labels, logits_BxC.shape[-1], dtype=logits_BxC.dtype)
    return optax.sigmoid_binary_cross_entropy(logits_BxC, targets_BxC).mean(-1)


class ClassificationObjective(Objective):
    """A `SequenceClassifier` of `num_labels` classes trained with `loss` ('softmax' | 'sigmoid'); with
    `multi_label`, each text has a set of classes (sigmoid only)."""

    def __init__(self, num_labels: int, loss: str, multi_label: bool = False):
        if loss not in LOSSES:
            raise ValueError(f"finetune.loss={loss!r}: use one of {LOSSES}")
        if multi_label and loss != "sigmoid":
            raise ValueError(f"finetune.loss={loss!r}: multi-label data trains with 'sigmoid'")
        self.num_labels = num_labels
        self.loss_name = loss
        self.multi_label = multi_label

    def make_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SequenceClassifier:
        return SequenceClassifier(config.model, self.num_labels, rngs=rngs)

    def batch_layout(self, config: ml_collections.ConfigDict) -> dict[str, LogicalArray]:
        b, length = config.train.global_batch_size, config.train.seq_len
        return {"inputs": LogicalArray((b, length), jnp.int32, ("batch", "length")),
                "lengths": LogicalArray((b,), jnp.int32, ("batch",)),
                "labels": (LogicalArray((b, self.num_labels), jnp.int32, ("batch", None)) if self.multi_label
                           else LogicalArray((b,), jnp.int32, ("batch",)))}

    def loss(self, model: nnx.Module, batch: Batch) -> jax.Array:
        logits_BxC = model(batch["inputs"], batch["lengths"])
        return classification_loss(logits_BxC, batch["labels"], self.loss_name).mean()
