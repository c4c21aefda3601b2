"""The decoder with a sequence-classification head, as transformers' GPT2ForSequenceClassification.

The hidden state of each row's last real token (position lengths_B - 1, from explicit lengths: a pad id
may equal EOS, so it is never searched for) goes through `score` [d_model, num_labels] without bias.
The backbone's parameters keep the language model's names (wte, blocks/..., ln_f), so a pretraining
checkpoint loads into them unchanged and only `score` starts fresh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import GPT
from cgpt_jax.model.layers import weight_param

HEAD = "score"  # the parameter a backbone checkpoint does not hold


class SequenceClassifier(GPT):
    def __init__(self, cfg: ml_collections.ConfigDict, num_labels: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)  # drawn first: the backbone's init equals the language model's
        self.num_labels = num_labels
        self.score = weight_param(rngs, cfg, "head", (cfg.d_model, num_labels), ("embed", "labels"))

    def __call__(self, tokens_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """Right-padded token ids [B, L] and real lengths [B] (1..L) → float32 class logits [B, C]."""
        h_BxLxD = self.features(tokens_BxL)
        last_B = jnp.clip(lengths_B.astype(jnp.int32) - 1, 0, tokens_BxL.shape[1] - 1)
        pooled_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        return jnp.dot(pooled_BxD.astype(jnp.float32), self.score[...].astype(jnp.float32))
