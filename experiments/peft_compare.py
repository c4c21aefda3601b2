"""Parameter-efficient fine-tuning methods side by side on one classification task (python -m cgpt_jax.finetune).

    --config=experiments/peft_compare.py:init=runs/cpu_ladder/d80l2,method=lora
    --config=experiments/peft_compare.py:init=runs/cpu_ladder/d80l2,method=head_only,lr=3e-3

`method` names a row of METHODS (or any config.finetune.method string); the rest is experiments/classify.py's
recipe, with the learning rate a method is usually trained at when `lr` is not given (a frozen base
takes a larger step: the added parameters start at zero or small). `sweep()` lists one run per method,
each `python -m cgpt_jax.finetune --config=experiments/peft_compare.py:init=...,method=NAME`.
See docs/peft.md.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import parse_arg
from cgpt_jax.experiments import classify

# name → (config.finetune.method, peak learning rate)
METHODS: dict[str, tuple[str, float]] = {
    "full": ("full", 3e-4),
    "head_only": ("head_only", 3e-3),
    "lora": ("lora(rank=8, alpha=16, targets='qkv|out|up|down')", 1e-3),
    "lora_qkv": ("lora(rank=4, alpha=8, targets='qkv')", 1e-3),
    "adapter": ("adapter(bottleneck=16)", 1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, init="", method="lora", task="stdlib_topics", lr=-1.0, steps=420, seed=0)
    method, default_lr = METHODS.get(args.method, (args.method, 1e-3))
    lr = default_lr if args.lr <= 0 else args.lr
    config = classify.get_config(f"task={args.task},init={args.init},steps={args.steps},lr={lr},seed={args.seed}")
    config.finetune.method = method
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """One run per method of METHODS on the backbone `init`."""
    args = parse_arg(arg, init="")
    return [{"name": name, "config_arg": f"init={args.init},method={name}"} for name in METHODS]
