"""Coordinate check: do activations keep their size as the model widens? SP and muP side by side.

    python -m cgpt_jax.mup_check [--widths=64,128,256,512,1024] [--steps=5] [--out=runs/mup_check]

Models of several widths (d_model; heads of `d_head` dimensions, d_ff = 4·d_model, fixed depth) take a
few Adam steps with the same hyperparameters at every width: Cerebras's init std (SP 0.02, muP base 0.08),
one constant learning rate (the muP base LR 6e-3) and muP's base width at the narrowest model. At each
step t (after t updates) the size of each layer type's output is measured:

    embedding      mean |x| of the embedding output fed to the first block (muP: times its multiplier)
    attn_logits    mean |x| of the scaled attention logits q·k·scale (causal entries)
    attn_output    mean |x| of the attention branch output (after the output projection)
    mlp_output     mean |x| of the MLP branch output
    residual       mean |x| of the residual stream after each block
    logits         mean |x - x_0| of the output logits

(layer types inside the blocks are averaged over layers; x_0 is the output at initialisation, see
CHANGE_LAYERS). The slope of log(size) against log(width), fitted per layer type and step, is 0 for a
width-independent size: muP should be flat at every step, SP grows once training has moved the weights.
Writes OUT/coord_check.png (a panel per layer type and parameterization, a line per step) and
OUT/coord_check.json, and prints the slopes at the last step with a verdict: muP passes when every
|slope| < 0.1, SP shows the blow-up when some slope > 0.3.

The models train on one small batch, the one they are measured on (see `measure`).
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from matplotlib import colormaps
from matplotlib.figure import Figure

from cgpt_jax import cli
from cgpt_jax.config import base_config, resolve
from cgpt_jax.data import make_dataset
from cgpt_jax.model import GPT
from cgpt_jax.model.attention.base import scores
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.setup import FAST_COMPILE, build_run

LAYER_TYPES = ("embedding", "attn_logits", "attn_output", "mlp_output", "residual", "logits")
# Measured as the change since initialisation: under muP the readout is scaled by 1/width, so the logits'
# initial values vanish as the width grows (like 1/sqrt(width)); what stays width-independent is their update.
CHANGE_LAYERS = ("logits",)
INIT_STD = {"sp": 0.02, "mup": 0.08}  # Cerebras-GPT's SP init and muP base init
LEARNING_RATE = 6e-3  # the muP base LR, used for both so that only the parameterization differs
MUP_MAX_SLOPE = 0.1  # muP passes when every |slope| at the last step is below this
SP_MIN_SLOPE = 0.3  # SP shows the blow-up when some slope at the last step is above this


def check_config(width: int, parameterization: str, *, base_width: int, d_head: int = 16, n_layers: int = 2,
                 seq_len: int = 16, batch_size: int = 2, vocab_size: int = 256,
                 lr: float = LEARNING_RATE) -> ml_collections.ConfigDict:
    """One model of the check: `width` = d_model (muP's base: `base_width`), constant learning rate."""
    if width % d_head:
        raise ValueError(f"width {width} is not a multiple of d_head={d_head}; choose widths divisible by it")
    config = base_config()
    m, t = config.model, config.train
    m.parameterization = parameterization
    m.mup_base_d_model, m.mup_base_d_ff = base_width, 4 * base_width
    m.vocab_size = config.data.synthetic_vocab_size = vocab_size
    m.d_model, m.n_heads, m.n_layers, m.d_ff = width, width // d_head, n_layers, 4 * width
    m.max_seq_len = t.seq_len = seq_len
    m.init_std = INIT_STD[parameterization]
    t.global_batch_size, t.peak_lr = batch_size, lr
    t.steps, t.warmup_steps, t.final_lr_fraction = 1_000_000, 0, 1.0  # constant LR over the few steps run
    config.mesh.data = 1
    return resolve(config)


def layer_outputs(model: GPT, tokens_BxL: jax.Array) -> dict[str, jax.Array]:
    """Every layer type's output on `tokens_BxL` (per-layer ones stacked on a leading layer axis): the
    model's forward pass step by step, with dense attention. Masked attention logits are set to 0."""
    x_BxLxD = model._embed(tokens_BxL, None)  # the decoder's own embedding and head, so multipliers apply
    causal_LxL = jnp.tril(jnp.ones((tokens_BxL.shape[1],) * 2, bool))

    def layer(x_BxLxD: jax.Array, block) -> tuple[jax.Array, dict[str, jax.Array]]:
        h_BxLxD = block.ln_attn(x_BxLxD)
        q, k, _ = block.attn.project(h_BxLxD)
        logits_BxHxLxL = jnp.where(causal_LxL, scores(q, k, block.attn.scale), 0.0)
        a_BxLxD = block.attn(h_BxLxD)
        x_BxLxD = x_BxLxD + a_BxLxD
        f_BxLxD = block.mlp(block.ln_mlp(x_BxLxD))
        x_BxLxD = x_BxLxD + f_BxLxD
        return x_BxLxD, {"attn_logits": logits_BxHxLxL, "attn_output": a_BxLxD, "mlp_output": f_BxLxD,
                         "residual": x_BxLxD}

    outputs = {"embedding": x_BxLxD}
    x_BxLxD, per_layer = nnx.scan(layer, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x_BxLxD, model.blocks)
    outputs.update(per_layer)
    outputs["logits"] = model.head(model.ln_f(x_BxLxD))[..., :model.cfg.vocab_size]
    return outputs


def coordinate_sizes(outputs: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean |x| per layer type; mean |x - x_0| for CHANGE_LAYERS (x_0: the outputs at initialisation)."""
    sizes = {}
    for name, x in outputs.items():
        x = np.abs(x - initial[name] if name in CHANGE_LAYERS else x).astype(np.float64)
        if name == "attn_logits":  # causal entries only: the rest are zeros
            length = x.shape[-1]
            sizes[name] = float(x.sum() / (x.size // length**2 * length * (length + 1) // 2))
        else:
            sizes[name] = float(x.mean())
    return sizes


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, list[float]]:
    """Coordinate size per layer type before each of `steps` + 1 Adam steps (index t: after t updates).

    The model trains on one fixed batch, the batch it is measured on: the infinite-width behaviour the
    check looks for shows once the width is large against the tokens in play, so a few tokens let it
    show at CPU widths."""
    run = build_run(config, make_mesh(config.mesh, jax.devices()[:1]), compiler_options=FAST_COMPILE)
    dataset = make_dataset(config.data, seq_len=config.train.seq_len, global_batch_size=config.train.global_batch_size,
                           seed=config.train.seed, sharding=run.batch_sharding)
    batch = next(iter(dataset.eval_batches()))
    outputs_of = jax.jit(lambda params: layer_outputs(nnx.merge(run.graphdef, params), batch["inputs"]),
                         compiler_options=FAST_COMPILE)
    state = run.init_state()  # the training recipe: optimizer, per-group learning rates and guard included
    trajectory: dict[str, list[float]] = {name: [] for name in LAYER_TYPES}
    initial = None
    for t in range(steps + 1):
        # The outputs of the forward pass that computes update t: the same parameters and batch.
        outputs = jax.device_get(outputs_of(state.params))
        initial = outputs if initial is None else initial
        for name, size in coordinate_sizes(outputs, initial).items():
            trajectory[name].append(size)
        if t < steps:  # the last update is not measured
            state, _ = run.train_step(state, batch)
    return trajectory


def fit_slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width); NaN where a value is 0 (a change at t = 0)."""
    if min(values) <= 0:
        return float("nan")
    slope, _ = np.polyfit(np.log(widths), np.log(values), 1)
    return float(slope)


def coord_check(widths: list[int], steps: int, **config_kwargs) -> dict:
    """Trajectories and slopes for both parameterizations (muP's base width: the narrowest model unless
    `base_width` is given): {param: {"trajectories": {width: {layer: [per step]}}, "slopes": {layer: [per step]}}}."""
    config_kwargs.setdefault("base_width", min(widths))
    results = {}
    for parameterization in ("sp", "mup"):
        trajectories = {width: measure(check_config(width, parameterization, **config_kwargs), steps)
                        for width in widths}
        slopes = {layer: [fit_slope(widths, [trajectories[w][layer][t] for w in widths]) for t in range(steps + 1)]
                  for layer in LAYER_TYPES}
        results[parameterization] = {"trajectories": trajectories, "slopes": slopes}
    return results


def verdict(results: dict) -> tuple[bool, bool, str]:
    """(muP is flat, SP blows up, a text report) from the slopes at the last step."""
    mup_last = {layer: s[-1] for layer, s in results["mup"]["slopes"].items()}
    sp_last = {layer: s[-1] for layer, s in results["sp"]["slopes"].items()}
    mup_flat = all(abs(s) < MUP_MAX_SLOPE for s in mup_last.values())
    sp_grows = any(s > SP_MIN_SLOPE for s in sp_last.values())
    lines = [f"{'layer':<12} {'SP slope':>9} {'muP slope':>10}"]
    lines += [f"{layer:<12} {sp_last[layer]:>9.3f} {mup_last[layer]:>10.3f}" for layer in LAYER_TYPES]
    lines.append(f"muP: {'PASS' if mup_flat else 'FAIL'} (every |slope| < {MUP_MAX_SLOPE} after the last step); "
                 f"SP: {'grows' if sp_grows else 'does not grow'} (some slope > {SP_MIN_SLOPE})")
    return mup_flat, sp_grows, "\n".join(lines)


def plot(results: dict, widths: list[int], path: pathlib.Path) -> None:
    """A panel per layer type (rows) and parameterization (columns): size against width, a line per step."""
    steps = len(next(iter(results["sp"]["trajectories"].values()))["logits"])
    fig = Figure(figsize=(9, 2.4 * len(LAYER_TYPES)))
    axes = fig.subplots(len(LAYER_TYPES), 2, sharex=True, sharey="row")
    for col, parameterization in enumerate(("sp", "mup")):
        result = results[parameterization]
        for row, layer in enumerate(LAYER_TYPES):
            ax = axes[row, col]
            for t in range(1 if layer in CHANGE_LAYERS else 0, steps):  # a change is 0 at t = 0
                ax.plot(widths, [result["trajectories"][w][layer][t] for w in widths], "o-", markersize=3,
                        color=colormaps["viridis"](0.9 * t / max(steps - 1, 1)), label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parameterization.upper()} {layer}: slope {result['slopes'][layer][-1]:+.2f}", fontsize=9)
            if col == 0:
                ax.set_ylabel("mean |x - x_0|" if layer in CHANGE_LAYERS else "mean |x|")
    for ax in axes[-1]:
        ax.set_xlabel("width (d_model)")
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    widths = sorted(int(w) for w in args.widths)
    if len(widths) < 2 or args.steps < 1:
        raise app.UsageError("--widths needs at least two widths to fit a slope, --steps at least 1")
    results = coord_check(widths, args.steps, base_width=args.base_width or widths[0], d_head=args.d_head,
                          n_layers=args.n_layers, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr)
    out = pathlib.Path(cli.resolve_path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    plot(results, widths, out / "coord_check.png")
    mup_flat, sp_grows, report = verdict(results)
    record = {"widths": widths, "steps": args.steps, "mup_flat": mup_flat, "sp_grows": sp_grows,
              **{p: {"slopes": {layer: [None if math.isnan(x) else x for x in s] for layer, s in r["slopes"].items()},
                     "trajectories": {str(w): t for w, t in r["trajectories"].items()}}
                 for p, r in results.items()}}
    (out / "coord_check.json").write_text(json.dumps(record, indent=1))
    print(f"slopes of log mean|activation| vs log width after {args.steps} Adam steps (widths {widths}):")
    print(report)
    print(f"plot: {out / 'coord_check.png'}\ndata: {out / 'coord_check.json'}")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module (tests) defines none.
    flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024"], "Model widths (d_model).")
    flags.DEFINE_integer("base_width", None, "muP's base width (mup_base_d_model); default: the narrowest "
                         "model, the proxy a muP user tunes on.")
    flags.DEFINE_integer("steps", 5, "Adam steps; sizes are measured after 0 .. steps updates.")
    flags.DEFINE_integer("n_layers", 2, "Depth (the same at every width).")
    flags.DEFINE_integer("d_head", 16, "Head dimension; heads = width / d_head.")
    flags.DEFINE_integer("seq_len", 16, "Sequence length.")
    flags.DEFINE_integer("batch_size", 2, "Sequences in the one training batch (few tokens: see measure()).")
    flags.DEFINE_float("lr", LEARNING_RATE, "The constant learning rate (muP: the base LR).")
    flags.DEFINE_string("out", "runs/mup_check", "Where to write coord_check.png and coord_check.json.")
    cli.run(main)
