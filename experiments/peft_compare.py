"""Parameter-efficient fine-tuning methods side by side on one classification task, as one sweep:

    python -m cgpt_jax.sweep --config=experiments/peft_compare.py:init=runs/cpu_ladder/d80l2 --workdir=runs/peft_compare
    python -m cgpt_jax.analyze runs/peft_compare     # report.md (the table) and peft_compare.png

The sweep trains every row of METHODS with `python -m cgpt_jax.finetune` (TRAINER); one run alone:

    python -m cgpt_jax.finetune --config=experiments/peft_compare.py:init=runs/cpu_ladder/d80l2,method=lora --workdir=DIR

`method` names a row of METHODS (or is any config.finetune.method string); the rest is experiments/classify.py's
recipe, with the learning rate a method is usually trained at when `lr` is not given (a frozen base takes a
larger step: the added parameters start at zero or small). Every method reads the same texts: max_len (108)
is the CPU ladder's context less the most virtual tokens of any row (prompt's 20). See docs/peft.md.
"""
from __future__ import annotations

import ml_collections
from cgpt_jax.experiments import classify

from cgpt_jax import peft
from cgpt_jax.config import parse_arg

TRAINER = "cgpt_jax.finetune"

# name → (config.finetune.method, peak learning rate)
METHODS: dict[str, tuple[str, float]] = {
    "full": ("full", 3e-4),
    "head_only": ("head_only", 3e-3),
    "lora": ("lora(rank=8, alpha=16, targets='qkv|out|up|down')", 1e-3),
    "lora_qkv": ("lora(rank=4, alpha=8, targets='qkv')", 1e-3),
    "adapter": ("adapter(bottleneck=16)", 1e-3),
    "prompt": ("prompt(tokens=20)", 3e-2),
    "prefix": ("prefix(tokens=10)", 1e-2),
}
# Every method reads the same texts: the CPU ladder's context (128) less the most virtual tokens of any row.
MAX_LEN = 128 - max(peft.build(method).virtual_tokens() for method, _ in METHODS.values())


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, init="", method="lora", task="stdlib_topics", lr=-1.0, steps=420, max_len=MAX_LEN,
                     eval_every=60, seed=0)
    method, default_lr = METHODS.get(args.method, (args.method, 1e-3))
    lr = default_lr if args.lr <= 0 else args.lr
    config = classify.get_config(f"task={args.task},init={args.init},steps={args.steps},lr={lr},seed={args.seed},"
                                 f"max_len={args.max_len},eval_every={args.eval_every}")
    config.finetune.method = method
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """One run per method of METHODS on the backbone `init` (with `steps` and `eval_every` when given)."""
    args = parse_arg(arg, init="", steps=420, eval_every=60)
    return [{"name": name, "config_arg": f"init={args.init},method={name},steps={args.steps},"
                                         f"eval_every={args.eval_every}"}
            for name in METHODS]
