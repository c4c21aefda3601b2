"""The Cerebras-GPT recipe in optax: AdamW, global-norm clipping, linear warmup then linear/cosine decay.

Under muP each parameter's update (Adam step and decoupled weight decay together) is further multiplied by
its group's learning-rate multiplier (cgpt_jax/model/parameterization.py), which is Cerebras's AdamBase
with per-group learning rates; under SP the chain is plain AdamW.
"""
from __future__ import annotations

import jax
import ml_collections
import optax

from cgpt_jax.model import parameterization
from cgpt_jax.treepath import path_name

NO_DECAY_NAMES = ("scale",)  # LayerNorm scales; every parameter whose name ends in "bias" is excluded too


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


def decays(path) -> bool:
    """Weight decay applies to weight matrices and embeddings, not to biases or LayerNorm parameters."""
    name = path_name(path).rsplit("/", 1)[-1]
    return not (name.endswith("bias") or name in NO_DECAY_NAMES)


def weight_decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def lr_multiplier(model_cfg: ml_collections.ConfigDict, path) -> float:
    """The learning rate of the parameter at `path` relative to train.peak_lr."""
    return parameterization.lr_multiplier(model_cfg, parameterization.param_group(path_name(path)))


def scale_by_lr_multipliers(model_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Multiply each parameter's update by its group's learning-rate multiplier (constants, so jit folds them)."""
    def init(params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * lr_multiplier(model_cfg, path), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(t: ml_collections.ConfigDict,
                   model_cfg: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
    """The optimizer for `t`; pass the model config (required for muP) to get its per-group learning rates."""
    adamw = optax.adamw(lr_schedule(t), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                        weight_decay=t.weight_decay, mask=weight_decay_mask)
    if model_cfg is None or not parameterization.is_mup(model_cfg):
        return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw, scale_by_lr_multipliers(model_cfg))
