"""Attention variants on the CPU ladder: one scaling curve per variant, all from one sweep.

The comparison (seven variants on the four smallest rungs, 28 runs, 27 minutes on 2 shared cores), then
one L(C) per variant in one plot (scaling.png) and one table (report.md, fit.json):

    python -m cgpt_jax.sweep --config=experiments/attention_variants.py:sizes=d16l2/d24l2/d32l2/d48l2 --workdir=runs/attention_variants
    python -m cgpt_jax.analyze runs/attention_variants --group_by=model.attention

`:variants=dense/rope,sizes=...` picks variants ('/'-separated keys of VARIANTS; default all of them and
all six rungs); `--config=experiments/attention_variants.py:size=d48l2,variant=alibi` is one run.

A run is a rung of experiments/cpu_ladder.py with `config.model.attention` replaced. Every variant of a
rung trains the dense rung's recipe: the same tokens, batch, steps and schedule (20 tokens per dense
parameter), so the curves differ by the attention alone; the compute axis counts each variant's own
FLOPs (its attention term, and no position table for RoPE/ALiBi). Runs are named `<variant>-<size>`
and record `model.attention` in their config.json, which is what separates the curves.

GQA is not in the default list: the ladder's head counts (2, 3, 4, 5, 6: heads of 16 dimensions) have
no common divisor above one, so `mqa` stands for KV sharing; `blockwise` is numerically dense and
checks that the memory-efficient core costs nothing in loss.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cpu_ladder

# sweep key -> config.model.attention (keys are run-name and command-line friendly)
VARIANTS = {
    "dense": "dense",
    "mqa": "mqa",
    "rope": "rope(theta=10000.0)",
    "alibi": "alibi",
    "window32": "sliding_window(window=32)",  # a quarter of the ladder's 128-token context
    "blockwise32": "blockwise(block=32)",
    "fused": "fused",
}


def _choose(listing: str, known: dict | list, what: str) -> list[str]:
    chosen = [item for item in listing.split("/") if item]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        raise InputError(f"{what}={listing!r}: choose '/'-separated names from {list(known)}")
    return chosen


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size=next(iter(cpu_ladder.SIZES)), variant="dense")
    if args.variant not in VARIANTS:
        raise InputError(f"unknown variant {args.variant!r}; choose one of {list(VARIANTS)}")
    config = cpu_ladder.get_config(f"size={args.size}")
    config.model.attention = VARIANTS[args.variant]
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """Every chosen variant on every chosen rung (default: all of both)."""
    args = parse_arg(arg, variants="/".join(VARIANTS), sizes="/".join(cpu_ladder.SIZES))
    return [{"name": f"{variant}-{size}", "config_arg": f"size={size},variant={variant}"}
            for variant in _choose(args.variants, VARIANTS, "variants")
            for size in _choose(args.sizes, cpu_ladder.SIZES, "sizes")]
