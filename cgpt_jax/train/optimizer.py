"""The Cerebras-GPT recipe in optax: AdamW, global-norm clipping, linear warmup then linear/cosine decay.

Under muP each parameter's update (Adam step and decoupled weight decay together) is further multiplied by
its group's learning-rate multiplier (cgpt_jax/model/parameterization.py), which is Cerebras's AdamBase
with per-group learning rates; under SP the chain is plain AdamW. Which parameters are decayed, and each
one's group, are read from the declarations the parameters carry (Variable metadata), so the optimizer is
given nnx.State trees.

A fine-tuning method that freezes part of the model (cgpt_jax/peft/) passes `trainable`, the function that
marks each parameter: the recipe (clipping included) then runs on the trainable parameters alone and holds
state only for them, and the frozen ones receive updates of -0.0, which leave every value bit for bit as it
was (x + -0.0 = x for every x, also -0.0, where + 0.0 would give +0.0).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cgpt_jax.model import parameterization
from cgpt_jax.model.parameterization import decays
from cgpt_jax.treepath import path_name


def lr_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    """0 → peak linearly over warmup_steps, then down to final_lr_fraction·peak at the last step."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    end = t.peak_lr * t.final_lr_fraction
    if t.decay == "linear":
        decay = optax.linear_schedule(t.peak_lr, end, decay_steps)
    else:  # modelzoo CosineDecayLR: end + (peak - end)·½(1 + cos(π·s/decay_steps))
        decay = optax.cosine_decay_schedule(t.peak_lr, decay_steps, alpha=t.final_lr_fraction)
    warmup = optax.linear_schedule(0.0, t.peak_lr, t.warmup_steps)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def _for_each_param(fn: Callable[[str, nnx.Variable], Any], tree) -> Any:
    """fn(name, param) for every parameter of `tree` (an nnx.State, or a tree of the same structure such as
    its gradients or updates, whose Variables carry the declarations): a tree with the results in place of
    the Variables."""
    def apply(path, param):
        if not isinstance(param, nnx.Variable):
            raise TypeError(f"{path_name(path)}: the optimizer takes nnx.State trees (their parameters' "
                            f"declarations are Variable metadata), got a {type(param).__name__} leaf")
        return fn(path_name(path), param)

    return jax.tree_util.tree_map_with_path(apply, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def weight_decay_mask(params):
    """True for the parameters weight decay applies to (`parameterization.decays`: weight matrices and
    embeddings, not biases, LayerNorm parameters or vectors, unless a parameter declares otherwise)."""
    return _for_each_param(decays, params)


def lr_multiplier(model_cfg: ml_collections.ConfigDict, name: str, param: nnx.Variable) -> float:
    """The learning rate of parameter `param` (at path `name`) relative to train.peak_lr."""
    return parameterization.lr_multiplier(model_cfg, parameterization.param_group(name, param))


def scale_by_lr_multipliers(model_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Multiply each parameter's update by its group's learning-rate multiplier (constants, so jit folds them)."""
    def init(params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        multipliers = _for_each_param(functools.partial(lr_multiplier, model_cfg), updates)
        return jax.tree.map(lambda m, u: jax.tree.map(lambda x: x * m, u), multipliers, updates), state

    return optax.GradientTransformation(init, update)


def keep_frozen() -> optax.GradientTransformation:
    """Stateless updates of -0.0 (see the module docstring)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates))


def make_optimizer(t: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict | None = None,
                   trainable: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """The optimizer for `t`; pass the model config (required for muP) to get its per-group learning rates,
    and `trainable` (params → the same tree with True/False per parameter) to freeze the parameters it marks
    False."""
    adamw = optax.adamw(lr_schedule(t), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                        weight_decay=t.weight_decay, mask=weight_decay_mask)
    if model_cfg is None or not parameterization.is_mup(model_cfg):
        recipe = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw)
    else:
        recipe = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw, scale_by_lr_multipliers(model_cfg))
    if trainable is None:
        return recipe
    return optax.multi_transform({True: recipe, False: keep_frozen()}, trainable)
