"""The model: the GPT decoder, its layers and the attention plug-ins."""
from __future__ import annotations

import math

import jax
import ml_collections
from flax import nnx

from cgpt_jax.model.gpt import GPT, padded_vocab_size
from cgpt_jax.treepath import path_name

EMBEDDING_PARAMS = ("wte", "wpe")


def abstract_model(model_cfg: ml_collections.ConfigDict) -> GPT:
    """The model with ShapeDtypeStructs for parameters: shapes without allocating anything."""
    return nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)))


def params_count(model_cfg: ml_collections.ConfigDict, *, non_embedding: bool = False) -> int:
    """Parameters of the model (tied LM head counted once), from abstract shapes."""
    params = nnx.state(abstract_model(model_cfg), nnx.Param)
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if non_embedding and path_name(path).split("/")[0] in EMBEDDING_PARAMS:
            continue
        total += math.prod(leaf.shape)
    return total


def attention_projection_params(model_cfg: ml_collections.ConfigDict) -> int:
    """Weights of one layer's attention that multiply the residual stream (2-D or more, with an 'embed'
    axis: Q, K, V and output projections), from abstract shapes: 4·d² for dense, less for GQA/MQA."""
    from cgpt_jax.model import attention

    layer = nnx.eval_shape(lambda: attention.build(model_cfg.attention).make(model_cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(p.shape) for _, p in nnx.to_flat_state(nnx.state(layer, nnx.Param))
               if p.ndim >= 2 and "embed" in p.get_metadata()["logical_axes"])


__all__ = ["GPT", "abstract_model", "attention_projection_params", "params_count", "padded_vocab_size"]
