"""The Cerebras-GPT recipe in optax: AdamW, global-norm clipping, linear warmup then linear/cosine decay."""
from __future__ import annotations

import jax
import ml_collections
import optax

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


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip_norm),
        optax.adamw(lr_schedule(t), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                    weight_decay=t.weight_decay, mask=weight_decay_mask),
    )
