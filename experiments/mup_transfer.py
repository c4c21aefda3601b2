"""muP learning-rate transfer on the CPU corpus: the best learning rate should stay at one grid point across
widths under muP and move under SP.

    python -m cgpt_jax.sweep --config=experiments/mup_transfer.py --workdir=runs/mup_transfer
    python -m cgpt_jax.scaling.transfer runs/mup_transfer
    --config=experiments/mup_transfer.py:width=64,lr=0.004,param=mup      (one run)
    --config=experiments/mup_transfer.py:widths=16/64,lrs=0.004/0.016     (as the sweep's argument: a subset)

Every run is the CPU ladder's recipe on its corpus (experiments/cpu_ladder.py: the standard library, a
512-token BPE, AdamW with clipping and weight decay, 10% linear warmup, linear decay to 10%) with the
same tokens (STEPS x BATCH x SEQ_LEN), so only width, learning rate and parameterization differ. Models:
2 layers, 2 heads (the head dimension grows with the width, so muP's 1/d_head attention matters),
d_ff = 4 d_model. SP uses Cerebras-GPT's init std 0.02; muP Cerebras's tuned base init 0.08 and
embedding multiplier 10, with the narrowest model as its base width, the proxy a muP user tunes on: at
that width the two share the learning-rate axis, and under muP `peak_lr` stays the base LR while the
hidden matrices of a model m times wider train at peak_lr / m.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cerebras_gpt, cpu_ladder

WIDTHS = (16, 32, 64, 128)
# Peak learning rates, a factor of 2 apart, around each parameterization's optimum at the narrowest width
# (muP's lies higher there: its embedding multiplier and larger init change the proxy).
LRS = {"sp": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), "mup": (1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1, 2.56e-1)}
PARAMETERIZATIONS = tuple(LRS)
N_LAYERS = 2
N_HEADS = 2
STEPS = 200
BATCH = 16
SEQ_LEN = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, width=WIDTHS[0], lr=LRS["mup"][0], param="mup")
    if args.param not in PARAMETERIZATIONS:
        raise InputError(f"param={args.param!r}: choose one of {list(PARAMETERIZATIONS)}")
    if args.width % N_HEADS:
        raise InputError(f"width={args.width} must be a multiple of the {N_HEADS} heads")
    config = cpu_ladder.cpu_base_config(next(iter(cpu_ladder.SIZES)))
    m, t = config.model, config.train
    m.d_model, m.n_layers, m.n_heads, m.d_ff = args.width, N_LAYERS, N_HEADS, 4 * args.width
    m.max_seq_len = t.seq_len = SEQ_LEN
    if args.param == "mup":
        cerebras_gpt.use_mup(config)
        m.mup_base_d_model, m.mup_base_d_ff = WIDTHS[0], 4 * WIDTHS[0]
    t.peak_lr = args.lr
    t.global_batch_size, t.steps = BATCH, STEPS
    t.warmup_steps = round(cpu_ladder.WARMUP_FRACTION * STEPS)
    return config


def _floats(listing: str, what: str) -> list[float]:
    try:
        return [float(x) for x in listing.split("/") if x]
    except ValueError:
        raise InputError(f"{what}={listing!r}: expected '/'-separated numbers") from None


def sweep(arg: str | None = None) -> list[dict]:
    """Every learning rate of its grid at every width, SP and muP (default: the full grids; `lrs` replaces
    both grids)."""
    args = parse_arg(arg, params="/".join(PARAMETERIZATIONS), widths="/".join(map(str, WIDTHS)), lrs="")
    params = [p for p in args.params.split("/") if p]
    if not params or set(params) - set(PARAMETERIZATIONS):
        raise InputError(f"params={args.params!r}: choose '/'-separated names from {list(PARAMETERIZATIONS)}")
    widths = [int(w) for w in _floats(args.widths, "widths")]
    lrs = {param: _floats(args.lrs, "lrs") or LRS[param] for param in params}
    # Width-major, so that a sweep stopped early has whole widths of both parameterizations.
    return [{"name": f"{param}-d{width}-lr{lr:g}", "config_arg": f"width={width},lr={lr!r},param={param}"}
            for width in widths for param in params for lr in lrs[param]]
