"""IsoFLOP sweep at CPU size, for the Chinchilla fit L(N, D) = E + A/N^alpha + B/D^beta.

    python -m cgpt_jax.sweep --config=experiments/cpu_isoflop.py --workdir=runs/cpu_isoflop
    python -m cgpt_jax.analyze runs/cpu_isoflop

Not yet run end to end on this machine (an estimated 15 minutes for the 12 runs).

Three compute budgets, four model sizes each, spanning about 5 to 100 tokens per (total) parameter
around the 20 tokens/param point; every run spends its budget exactly, in the Cerebras FLOP convention of
cgpt_jax.flops (the compute axis of the analysis). The recipe and corpus are the CPU ladder's
(experiments/cpu_ladder.py), so the two sweeps' losses are comparable.
`--config=experiments/cpu_isoflop.py:size=d48l2,budget=1.2e12` trains one run.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax import flops
from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments.cpu_ladder import BATCH, SEQ_LEN, SIZES, WARMUP_FRACTION, cpu_base_config

SIZES = {**SIZES, "d64l3": (64, 3, 4), "d80l3": (80, 3, 5)}  # (d_model, n_layers, n_heads)
# budget (training FLOPs, Cerebras convention) -> the sizes trained at it
BUDGETS = {
    4e11: ("d16l2", "d24l2", "d32l2", "d48l2"),
    1.2e12: ("d24l2", "d32l2", "d48l2", "d64l2"),
    3.6e12: ("d48l2", "d64l2", "d64l3", "d80l3"),
}
MIN_STEPS = 50  # fewer steps than this is not a training run worth fitting


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="d32l2", budget=1.2e12)
    if args.size not in SIZES:
        raise InputError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    d_model, n_layers, n_heads = SIZES[args.size]
    config = cpu_base_config("d32l2")
    m, t = config.model, config.train
    m.d_model, m.n_layers, m.n_heads, m.d_ff = d_model, n_layers, n_heads, 4 * d_model
    flops_per_step = flops.flops_per_token(flops.Shape.from_model_config(m, SEQ_LEN), "cerebras") * BATCH * SEQ_LEN
    t.steps = round(args.budget / flops_per_step)
    if t.steps < MIN_STEPS:
        raise InputError(f"budget={args.budget:g} buys {t.steps} steps of {args.size}; use a budget of at least "
                         f"{MIN_STEPS * flops_per_step:.3g} FLOPs or a smaller size")
    t.warmup_steps = max(1, round(WARMUP_FRACTION * t.steps))
    return config


def sweep(arg: str | None = None) -> list[dict]:
    return [{"name": f"c{budget:.1e}_{size}".replace("+", ""), "config_arg": f"size={size},budget={budget:g}"}
            for budget, sizes in BUDGETS.items() for size in sizes]
