"""A parsed method in training: the model with its added parameters, which parameters train, a loss that
computes no gradient for the frozen ones, and merging.

`train/setup.py:build_run` calls `with_method(objective, recipe)`: for `full` the objective is returned
unchanged (pretraining and full fine-tuning are set up exactly as before); otherwise a `PeftObjective`
whose model carries `model.peft` and whose loss sees the frozen parameters through stop_gradient, and
`trainable` is the filter the optimizer partitions on (train/optimizer.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from cgpt_jax.errors import InputError
from cgpt_jax.peft import Recipe
from cgpt_jax.peft.base import HEAD, PEFT, Added
from cgpt_jax.train.objective import Batch, Objective


class Stack(Added):
    """The added parameters of every method of a recipe, under 'peft/<method name>/...', applied in order."""

    def __init__(self, recipe: Recipe, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        names = []
        for c in recipe.components:
            added = c.method.make(model_cfg, rngs)
            if added is not None:
                setattr(self, c.name, added)
                names.append(c.name)
        self.names = tuple(names)
        # At most one method has virtual tokens: they claim the 'positions' slot.
        self.virtual_ids = tuple(i for name in names for i in getattr(self, name).virtual_ids)

    def virtual_cache(self, model: nnx.Module) -> dict[str, jax.Array] | None:
        for name in self.names:
            cache = getattr(self, name).virtual_cache(model)
            if cache is not None:
                return cache
        return None

    def adapt_blocks(self, blocks: nnx.Module) -> nnx.Module:
        for name in self.names:
            blocks = getattr(self, name).adapt_blocks(blocks)
        return blocks

    def merge_into(self, blocks: nnx.Module) -> nnx.Module:
        for name in self.names:
            blocks = getattr(self, name).merge_into(blocks)
        return blocks


def attach(model: nnx.Module, recipe: Recipe, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """`model` (a GPT or one of its subclasses, already initialised) with the recipe's parameters added,
    drawn from `rngs` after the base's, so the base's init is the same with or without a method."""
    stack = Stack(recipe, model_cfg, rngs)
    model.peft = stack if stack.names else None
    return model


def is_trainable(recipe: Recipe, path: tuple[Any, ...]) -> bool:
    """Whether the parameter at `path` (an nnx path, e.g. ('blocks', 'attn', 'qkv_kernel')) trains."""
    return recipe.trains_base or str(path[0]) in (PEFT, HEAD)


def trainable_mask(recipe: Recipe, params: nnx.State) -> nnx.State:
    """The tree of `params` with True (trains) or False in place of each parameter."""
    return nnx.from_flat_state([(path, is_trainable(recipe, path)) for path, _ in nnx.to_flat_state(params)])


def split_trainable(recipe: Recipe, params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parameters of `params`."""
    flat = nnx.to_flat_state(params)
    return (nnx.from_flat_state([(p, v) for p, v in flat if is_trainable(recipe, p)]),
            nnx.from_flat_state([(p, v) for p, v in flat if not is_trainable(recipe, p)]))


def frozen(recipe: Recipe, model: nnx.Module) -> nnx.Module:
    """`model` whose frozen parameters are constants to autodiff: their weight gradients are not computed
    (and are exact zeros), the backward pass stops where nothing below trains (head_only)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.from_flat_state([(p, v if is_trainable(recipe, p) else v.replace(jax.lax.stop_gradient(v[...])))
                                  for p, v in nnx.to_flat_state(params)])
    return nnx.merge(graphdef, params, rest)


class PeftObjective(Objective):
    """`inner`'s model, batch and loss, with the recipe's parameters added and the base frozen."""

    def __init__(self, inner: Objective, recipe: Recipe):
        self.inner = inner
        self.recipe = recipe

    def make_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        return attach(self.inner.make_model(config, rngs), self.recipe, config.model, rngs)

    def batch_layout(self, config: ml_collections.ConfigDict):
        return self.inner.batch_layout(config)

    def loss(self, model: nnx.Module, batch: Batch) -> jax.Array:
        return self.inner.loss(frozen(self.recipe, model), batch)


def with_method(objective: Objective, recipe: Recipe, config: ml_collections.ConfigDict) -> Objective:
    """`objective` set up for `recipe` (itself for `full`). A recipe that would train nothing is refused
    (head_only on a language model, which has no task head)."""
    if recipe.is_full:
        return objective
    if not recipe.trains_base and not recipe.adds_params:
        model = nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0)))
        if getattr(model, HEAD, None) is None:
            raise InputError(f"config.finetune.method={recipe.spec!r} trains no parameter of this model (it has "
                             f"no task head) — use 'full' or a method that adds parameters, e.g. 'lora'")
    return PeftObjective(objective, recipe)


def merge(model: nnx.Module) -> nnx.Module:
    """The model with its mergeable method folded into the base weights and `peft` removed: the base's
    forward pass at the base's speed."""
    if model.peft is None:
        return model
    model.blocks = model.peft.merge_into(model.blocks)
    model.peft = None
    return model


def base_params(params: nnx.State) -> nnx.State:
    """`params` without the method's added parameters: what a base checkpoint holds."""
    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(params) if str(p[0]) != PEFT])


def keeping_added(load: Callable[[nnx.State], nnx.State]) -> Callable[[nnx.State], nnx.State]:
    """An initialiser (params as initialised → params to start from) that takes the base's parameters from
    `load` (called with `base_params(like)`) and keeps the method's added parameters as initialised."""
    def init(like: nnx.State) -> nnx.State:
        loaded = dict(nnx.to_flat_state(load(base_params(like))))
        return nnx.from_flat_state([(p, loaded.get(p, v)) for p, v in nnx.to_flat_state(like)])
    return init


def abstract_with_method(make: Callable[[], nnx.Module], method: str,
                         model_cfg: ml_collections.ConfigDict) -> nnx.Module:
    """The model `make` builds with `method`'s parameters attached, shapes only (what a run's checkpoints
    hold)."""
    from cgpt_jax.peft import build

    recipe = build(method)
    return nnx.eval_shape(lambda: attach(make(), recipe, model_cfg, nnx.Rngs(1)))


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The language model a run's config.json describes, with its method's parameters; runs from before
    config.finetune.method have none."""
    from cgpt_jax.model import GPT

    return abstract_with_method(lambda: GPT(config.model, rngs=nnx.Rngs(0)),
                                config.get("finetune", {}).get("method", "full"), config.model)
