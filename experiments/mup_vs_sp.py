"""muP against SP on the CPU ladder: one scaling curve per parameterization, each with its learning rate
tuned as a user of it would (the paper's third claim: muP scales better and more predictably).

    python -m cgpt_jax.sweep --config=experiments/mup_vs_sp.py --workdir=runs/mup_vs_sp
    python -m cgpt_jax.scaling.mup_vs_sp runs/mup_vs_sp        # report.md, fit.json, scaling.png
    bash launch/local.sh mup_vs_sp                              # both, into runs/mup_vs_sp

Every run is a rung of the main job's ladder (experiments/cpu_ladder.py: 20 tokens per parameter, its
batch rule, corpus and recipe) at one peak learning rate of a grid a factor of 2 apart. SP keeps
Cerebras-GPT's init 0.02; muP takes Cerebras's tuned base init 0.08 and embedding multiplier 10, with the
narrowest rung as its base width. The analysis (cgpt_jax/scaling/mup_vs_sp.py) takes, for SP, each
width's best learning rate (tuned per width, as Cerebras-GPT chose a learning rate per size) and, for
muP, the learning rate that is best at the narrowest width, used unchanged at every width (tuned once on
the proxy). Every width is trained at every grid point under both, so the report also shows whether
muP's choice stays the best at the larger widths. The grids are centred on each parameterization's
optimum at the narrowest width (docs/mup.md: muP's lies about 16x higher there).
`--config=experiments/mup_vs_sp.py:size=d32l2,lr=0.064,param=mup` trains one run.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cerebras_gpt, cpu_ladder

SIZES = ("d16l2", "d24l2", "d32l2", "d40l2", "d48l2")  # the ladder's rungs up to d48: 15 minutes for both
LRS = {"sp": (2e-3, 4e-3, 8e-3), "mup": (3.2e-2, 6.4e-2, 1.28e-1)}
PARAMETERIZATIONS = tuple(LRS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size=SIZES[0], lr=LRS["sp"][1], param="sp")
    if args.param not in PARAMETERIZATIONS:
        raise InputError(f"param={args.param!r}: choose one of {list(PARAMETERIZATIONS)}")
    if args.lr <= 0:
        raise InputError(f"lr={args.lr:g} must be a positive learning rate")
    config = cpu_ladder.get_config(f"size={args.size}")
    if args.param == "mup":
        cerebras_gpt.use_mup(config)
        base_width = cpu_ladder.SIZES[SIZES[0]][0]
        config.model.mup_base_d_model, config.model.mup_base_d_ff = base_width, 4 * base_width
    config.train.peak_lr = args.lr
    return config


def sweep(arg: str | None = None) -> list[dict]:
    """Every rung at every learning rate of its parameterization's grid; rung-major, so that a sweep
    stopped early has whole rungs of both parameterizations."""
    return [{"name": f"{param}-{size}-lr{lr:g}", "config_arg": f"size={size},lr={lr!r},param={param}"}
            for size in SIZES for param in PARAMETERIZATIONS for lr in LRS[param]]
