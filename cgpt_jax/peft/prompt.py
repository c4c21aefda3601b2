"""`prompt(tokens=20)`: prompt tuning (Lester et al., 2021). `tokens` trainable vectors are fed before every
sequence in place of token embeddings, at positions 0..tokens-1 (the input's tokens move to tokens.., as in
HF PEFT); the whole model stays frozen.

The vectors start as the token embeddings of `virtual_ids`, token ids drawn once from the vocabulary
(Lester et al.'s vocabulary initialisation), and train as an offset from them: vector i = wte[ids[i]] +
delta[i], delta [tokens, d_model] zero at init. So at init the model reads those ids first, whatever base it
is loaded onto (`keeping_added` loads the base after the method is drawn).

The prompt never sees the input (causal attention), so its keys and values in every layer depend on the
parameters alone: `virtual_cache` runs it through the layers once per forward pass, at batch 1, and the
model puts the result in the KV cache's first slots (cgpt_jax/model/gpt.py), for training and decoding alike.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cgpt_jax.model import attention, parameterization
from cgpt_jax.model.layers import take_rows
from cgpt_jax.peft import register
from cgpt_jax.peft.base import Added, Method

_IDS_SEED = 0  # the virtual tokens' initial ids are a fixed draw: a checkpoint's method string rebuilds them


def vocabulary_ids(vocab_size: int, tokens: int) -> tuple[int, ...]:
    """`tokens` distinct token ids (with repeats only past the vocabulary's size), the same on every call."""
    rng = np.random.default_rng(_IDS_SEED)
    return tuple(int(i) for i in rng.choice(vocab_size, tokens, replace=tokens > vocab_size))


class VirtualTokensMethod(Method):
    """What `prompt` and `prefix` share: `tokens` virtual positions before every sequence."""

    slots: ClassVar[tuple[str, ...]] = ("positions",)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"tokens": 4},)

    @classmethod
    def validate(cls, model_cfg: ml_collections.ConfigDict, **options: Any) -> None:
        tokens = options["tokens"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise ValueError(f"tokens={tokens!r} must be a positive integer, e.g. tokens=20")
        if not attention.build(model_cfg.attention).supports_decode:
            raise ValueError(f"the virtual tokens' keys and values live in the KV cache, and attention "
                             f"{model_cfg.attention!r} has none — use a variant that decodes (e.g. 'dense')")

    @classmethod
    def virtual_tokens(cls, **options: Any) -> int:
        return options["tokens"]


class SoftPrompt(Added):
    def __init__(self, model_cfg: ml_collections.ConfigDict, tokens: int):
        self.virtual_ids = vocabulary_ids(model_cfg.vocab_size, tokens)
        self.delta = nnx.Param(jnp.zeros((tokens, model_cfg.d_model), jnp.dtype(model_cfg.param_dtype)),
                               logical_axes=(None, "embed"), **{parameterization.GROUP_KEY: "vector",
                                                                parameterization.INIT_KEY: "zeros"})

    def virtual_cache(self, model: nnx.Module) -> dict[str, jax.Array]:
        ids_N = jnp.asarray(self.virtual_ids, jnp.int32)
        vectors_NxD = take_rows(model.wte, ids_N).astype(model.compute_dtype) + self.delta[...].astype(
            model.compute_dtype)
        return model.encode_virtual(vectors_NxD)


@register("prompt")
class Prompt(VirtualTokensMethod):
    options: ClassVar[dict[str, Any]] = {"tokens": 20}

    def make(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SoftPrompt:
        return SoftPrompt(model_cfg, self.opts["tokens"])
