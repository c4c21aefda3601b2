"""Learning-rate transfer across widths: the best learning rate of each width, per parameterization.

    python -m cgpt_jax.scaling.transfer DIR [--out=DIR]

Reads a sweep workdir whose runs differ in model.parameterization, model.d_model and train.peak_lr
(experiments/mup_transfer.py), takes each run's final validation loss, and writes DIR/transfer.png (loss
against learning rate, a line per width, a panel per parameterization), DIR/transfer.json and
DIR/transfer.md (the loss grid and the optimum of each width). Under muP the optimum should sit at the
same grid point, or an adjacent one, at every width ("transfers"); under SP it moves.

A run that did not finish or diverged (cgpt_jax/scaling/results.py) has no loss and cannot be an optimum.
`interpolated_lr` is the vertex of a parabola in log2(LR) through the best grid point and its two
neighbours (none when the best point is at the edge of the grid).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import app, flags
from matplotlib import colormaps
from matplotlib.figure import Figure

from cgpt_jax import cli
from cgpt_jax.errors import InputError
from cgpt_jax.scaling.results import collect_runs, select_group

MAX_SPREAD = 1  # grid points between the widths' optima that still count as "transfers"


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    parameterization: str
    width: int
    lr: float
    loss: float | None  # None: unfinished, failed or diverged
    problems: tuple[str, ...]


def collect(workdir: Path, experiment: str | None = None) -> list[Point]:
    """Every run of the sweep in `workdir` as a (parameterization, width, LR, loss) point."""
    points = []
    for run in select_group(collect_runs(workdir), experiment):
        if run.config is None:
            continue  # never started: no config.json to place it on the grid
        model, train = run.config["model"], run.config["train"]
        points.append(Point(run.name, model.get("parameterization", "sp"), int(model["d_model"]),
                            float(train["peak_lr"]), run.loss if run.usable else None, tuple(run.problems)))
    if not points:
        raise ValueError(f"{workdir} has no started runs; run the sweep first "
                         f"(python -m cgpt_jax.sweep --config=experiments/mup_transfer.py --workdir={workdir})")
    return points


def _interpolated(lrs: list[float], losses: list[float | None], best: int) -> float | None:
    if best in (0, len(lrs) - 1) or losses[best - 1] is None or losses[best + 1] is None:
        return None
    x = np.log2(lrs[best - 1:best + 2])
    a, b, _ = np.polyfit(x, losses[best - 1:best + 2], 2)
    return float(2 ** (-b / (2 * a))) if a > 0 else None


def optima(points: list[Point]) -> dict:
    """{parameterization: {"lrs": grid, "widths": {width: {"losses": [per LR], "best_lr", "best_index",
    "best_loss", "interpolated_lr"}}, "spread": grid points between the extreme optima, "transfers"}}."""
    out = {}
    for param in sorted({p.parameterization for p in points}):
        mine = [p for p in points if p.parameterization == param]
        lrs = sorted({p.lr for p in mine})
        widths = {}
        for width in sorted({p.width for p in mine}):
            by_lr = {p.lr: p.loss for p in mine if p.width == width}
            losses = [by_lr.get(lr) for lr in lrs]
            finite = [i for i, loss in enumerate(losses) if loss is not None]
            best = min(finite, key=lambda i: losses[i]) if finite else None
            widths[width] = {"losses": losses, "best_index": best,
                             "best_lr": None if best is None else lrs[best],
                             "best_loss": None if best is None else losses[best],
                             "interpolated_lr": None if best is None else _interpolated(lrs, losses, best)}
        indices = [w["best_index"] for w in widths.values() if w["best_index"] is not None]
        spread = max(indices) - min(indices) if indices else None
        out[param] = {"lrs": lrs, "widths": widths, "spread": spread,
                      "transfers": spread is not None and len(indices) == len(widths) and spread <= MAX_SPREAD}
    return out


def report_md(result: dict, points: list[Point]) -> str:
    lines = ["# Learning-rate transfer across widths", "",
             "Final validation loss per width (rows) and peak learning rate (columns; under muP the base LR). "
             "**Bold**: the width's optimum; —: no loss (unfinished or diverged).", ""]
    for param, r in result.items():
        lines += [f"## {param.upper()}", "", "| width | " + " | ".join(f"{lr:g}" for lr in r["lrs"]) +
                  " | best LR | interpolated |", "|---" * (len(r["lrs"]) + 3) + "|"]
        for width, w in r["widths"].items():
            cells = ["—" if loss is None else (f"**{loss:.4f}**" if i == w["best_index"] else f"{loss:.4f}")
                     for i, loss in enumerate(w["losses"])]
            interp = "—" if w["interpolated_lr"] is None else f"{w['interpolated_lr']:.3g}"
            best = "—" if w["best_lr"] is None else f"{w['best_lr']:g}"
            lines.append(f"| {width} | " + " | ".join(cells) + f" | {best} | {interp} |")
        verdict = ("no optimum" if r["spread"] is None else
                   f"optima span {r['spread']} grid point(s) across widths: "
                   + ("transfers" if r["transfers"] else "does not transfer"))
        edge = [str(width) for width, w in r["widths"].items() if w["best_index"] in (0, len(r["lrs"]) - 1)]
        if edge:
            verdict += f" (optimum at the edge of the grid for width {', '.join(edge)}: it may lie beyond)"
        lines += ["", f"{param.upper()}: {verdict}.", ""]
    excluded = [p for p in points if p.loss is None]
    if excluded:
        lines += ["## Runs without a loss", ""] + [f"- {p.name}: {', '.join(p.problems)}" for p in excluded]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(5 * len(result), 4))
    axes = fig.subplots(1, len(result), sharey=True, squeeze=False)[0]
    for ax, (param, r) in zip(axes, result.items()):
        for k, (width, w) in enumerate(r["widths"].items()):
            color = colormaps["viridis"](0.9 * k / max(len(r["widths"]) - 1, 1))
            xs = [lr for lr, loss in zip(r["lrs"], w["losses"]) if loss is not None]
            ys = [loss for loss in w["losses"] if loss is not None]
            ax.plot(xs, ys, "o-", color=color, label=f"d_model {width}")
            if w["best_lr"] is not None:
                ax.plot([w["best_lr"]], [w["best_loss"]], "*", color=color, markersize=14, markeredgecolor="k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate" + (" (base)" if param == "mup" else ""))
        ax.set_title(f"{param.upper()}: optima span {'—' if r['spread'] is None else r['spread']} grid point(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(workdir: Path, out_dir: Path, experiment: str | None = None) -> tuple[dict, dict[str, Path]]:
    points = collect(workdir, experiment)
    result = optima(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / "transfer.md", "json": out_dir / "transfer.json", "plot": out_dir / "transfer.png"}
    paths["report"].write_text(report_md(result, points))
    # Losses are finite or None (results.py keeps non-finite ones out), so this is strict JSON.
    paths["json"].write_text(json.dumps({"optima": result, "runs": [dataclasses.asdict(p) for p in points]}, indent=1))
    plot(result, paths["plot"])
    return result, paths


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m cgpt_jax.scaling.transfer DIR [--out=DIR]")
    workdir, args = Path(cli.resolve_path(argv[1])), flags.FLAGS
    try:
        result, paths = write_outputs(workdir, Path(cli.resolve_path(args.out)) if args.out else workdir,
                                      args.experiment)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    for param, r in result.items():
        best = ", ".join(f"d{width}: {'—' if w['best_lr'] is None else format(w['best_lr'], 'g')}"
                         for width, w in r["widths"].items())
        print(f"{param}: best LR per width {best}; optima span {r['spread']} grid point(s)"
              + (" (transfers)" if r["transfers"] else ""))
    print(f"report: {paths['report']}\nplot:   {paths['plot']}\njson:   {paths['json']}")


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module (tests) defines none.
    flags.DEFINE_string("out", None, "Where to write transfer.md/.json/.png; default: DIR.")
    flags.DEFINE_string("experiment", None, "When DIR mixes sweeps: a prefix of the one to read.")
    cli.run(main)
