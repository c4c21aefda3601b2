"""`prefix(tokens=10)`: prefix tuning (Li & Liang, 2021). Every layer's attention sees `tokens` trainable keys
and values before the input's, at positions 0..tokens-1 (the input's tokens move to tokens.., as in HF PEFT);
the whole model stays frozen. They go through the KV cache: its first slots hold them
(cgpt_jax/model/gpt.py), in training and decoding alike.

Each layer's prefix is a pair of arrays in the attention variant's own cache layout (for dense [kv_heads,
tokens, head_dim] each for 'k' and 'v'; RoPE's keys as the cache holds them, rotated), so any variant with a
KV cache takes it. Li & Liang found random prefixes unstable and initialised them from real tokens'
activations; here they start as the base's keys and values of `virtual_ids` (ids drawn once from the
vocabulary, as `prompt` draws them) and train as per-layer offsets from those, zero at init: so at init the
model reads those ids first, whatever base it is loaded onto. Trainable: 2 · layers · tokens · kv_heads ·
head_dim (2 · layers · tokens · d_model with multi-head attention).
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import parameterization
from cgpt_jax.model.layers import take_rows
from cgpt_jax.peft import register
from cgpt_jax.peft.base import Added
from cgpt_jax.peft.prompt import VirtualTokensMethod, vocabulary_ids


class PrefixKV(Added):
    def __init__(self, model_cfg: ml_collections.ConfigDict, tokens: int):
        from cgpt_jax.model.gpt import Block

        self.virtual_ids = vocabulary_ids(model_cfg.vocab_size, tokens)
        block = nnx.eval_shape(lambda: Block(model_cfg, rngs=nnx.Rngs(0)))
        layout = block.attn.cache_layout(1, tokens)
        self.names = tuple(layout)
        dtype = jnp.dtype(model_cfg.param_dtype)
        for name, spec in layout.items():
            keep = [i for i, axis in enumerate(spec.logical_axes) if axis != "batch"]  # one prefix for every row
            axes = tuple(None if spec.logical_axes[i] == "length" else spec.logical_axes[i] for i in keep)
            shape = tuple(spec.shape[i] for i in keep)
            setattr(self, name, nnx.Param(jnp.zeros((model_cfg.n_layers, *shape), dtype),
                                          logical_axes=("layers", *axes),
                                          **{parameterization.GROUP_KEY: "vector",
                                             parameterization.INIT_KEY: "zeros"}))
        self.batch_axis = 1 + layout[self.names[0]].logical_axes.index("batch")  # in the stacked cache

    def virtual_cache(self, model: nnx.Module) -> dict[str, jax.Array]:
        ids_N = jnp.asarray(self.virtual_ids, jnp.int32)
        start = model.encode_virtual(take_rows(model.wte, ids_N).astype(model.compute_dtype))
        return {name: start[name] + jnp.expand_dims(getattr(self, name)[...].astype(start[name].dtype),
                                                    self.batch_axis)
                for name in self.names}


@register("prefix")
class Prefix(VirtualTokensMethod):
    options: ClassVar[dict[str, Any]] = {"tokens": 10}

    def make(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> PrefixKV:
        return PrefixKV(model_cfg, self.opts["tokens"])
