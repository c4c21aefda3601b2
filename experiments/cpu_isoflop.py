"""IsoFLOP sweep at CPU size: which tokens per parameter is compute-optimal (Chinchilla approaches 2 and 3).

    python -m cgpt_jax.sweep --config=experiments/cpu_isoflop.py --workdir=runs/cpu_isoflop
    python -m cgpt_jax.analyze runs/cpu_isoflop --params=total
    bash launch/local.sh isoflop                   # both, into runs/cpu_isoflop

Four compute budgets a factor of 3 apart; at each, the SIZES_PER_BUDGET ladder widths whose tokens per
(total) parameter lie nearest 20 on a log scale, which spans about 3 to 120 tokens per parameter around
the 20 tokens/param point. Every run spends its budget exactly, in the Cerebras FLOP convention of
cgpt_jax.flops (the compute axis of the analysis), with the CPU ladder's recipe, corpus and batch rule
(experiments/cpu_ladder.py), so the two sweeps' losses are comparable.
`--config=experiments/cpu_isoflop.py:size=d48l2,budget=1.8e12` trains one run.
"""
from __future__ import annotations

import functools
import math

import ml_collections

from cgpt_jax import flops
from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cpu_ladder
from cgpt_jax.model import params_count

SIZES = cpu_ladder.SIZES  # widths at depth 2
BUDGETS = (2e11, 6e11, 1.8e12, 5.4e12)  # training FLOPs, Cerebras convention
SIZES_PER_BUDGET = 5
CENTRE_TOKENS_PER_PARAM = 20.0
MIN_STEPS = 50  # fewer steps than this is not a training run worth fitting


def tokens_at(config: ml_collections.ConfigDict, budget: float) -> float:
    """Tokens a model of `config` trains on to spend `budget` FLOPs (Cerebras convention)."""
    shape = flops.Shape.from_model_config(config.model, cpu_ladder.SEQ_LEN)
    return budget / flops.flops_per_token(shape, "cerebras")


@functools.cache
def _tokens_per_param_per_flop(size: str) -> float:
    config = cpu_ladder.cpu_base_config(size)
    return tokens_at(config, 1.0) / params_count(config.model)


def sizes_at(budget: float) -> list[str]:
    """The SIZES_PER_BUDGET sizes whose tokens per parameter at `budget` are nearest 20 (log scale)."""
    def distance(size: str) -> float:
        return abs(math.log(budget * _tokens_per_param_per_flop(size) / CENTRE_TOKENS_PER_PARAM))
    nearest = sorted(SIZES, key=distance)[:SIZES_PER_BUDGET]
    return [size for size in SIZES if size in nearest]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="d32l2", budget=BUDGETS[1])
    if args.budget <= 0:
        raise InputError(f"budget={args.budget:g} must be a positive number of training FLOPs")
    config = cpu_ladder.cpu_base_config(args.size)
    cpu_ladder.set_budget(config, tokens_at(config, args.budget))
    t = config.train
    if t.steps < MIN_STEPS:
        raise InputError(f"budget={args.budget:g} buys {t.steps} steps of {args.size}; use a larger budget or a "
                         f"smaller size")
    return config


def sweep(arg: str | None = None) -> list[dict]:
    return [{"name": f"c{budget:.1e}_{size}".replace("+", ""), "config_arg": f"size={size},budget={budget:g}"}
            for budget in BUDGETS for size in sizes_at(budget)]
