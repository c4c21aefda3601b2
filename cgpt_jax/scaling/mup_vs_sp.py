"""muP against SP: one L(C) per parameterization, each on the runs its learning-rate tuning picks.

    python -m cgpt_jax.scaling.mup_vs_sp DIR [--out=DIR]

Reads a sweep workdir whose runs are ladder rungs at a grid of peak learning rates under both
parameterizations (experiments/mup_vs_sp.py) and chooses, as a user of each would:
* SP: at every width, the learning rate with the lowest final validation loss (tuned per width);
* muP: the learning rate with the lowest loss at the narrowest width, kept at every width (tuned once).
Each parameterization's chosen runs are then fitted and compared as `analyze --group_by` compares
groups (cgpt_jax/scaling/groups.py): DIR/report.md (one table: exponent, residual spread, backtest error,
loss at a common compute; then how the learning rates were chosen), DIR/fit.json and DIR/scaling.png.
"""
from __future__ import annotations


from absl import app, flags

from cgpt_jax import cli, storage
from cgpt_jax.errors import InputError
from cgpt_jax.scaling.groups import GroupedAnalysis, compare_groups
from cgpt_jax.scaling.results import Run, collect_runs, config_value, select_group
from cgpt_jax.storage import Path

GROUP_BY = "model.parameterization"


def _grid(runs: list[Run]) -> dict[int, dict[float, Run]]:
    """{width: {learning rate: run}} of the runs that report a usable loss."""
    grid: dict[int, dict[float, Run]] = {}
    for run in runs:
        if run.usable:
            grid.setdefault(int(config_value(run, "model.d_model")), {})[float(config_value(run, "train.peak_lr"))] = run
    return grid


def choose(runs: list[Run], parameterization: str) -> tuple[list[Run], list[str]]:
    """The runs a user of `parameterization` would fit (see the module doc), and a markdown account of the
    choice: the loss grid with the chosen run of each width in bold."""
    grid = _grid(runs)
    if not grid:
        raise ValueError(f"no usable {parameterization} run; run the sweep first "
                         f"(python -m cgpt_jax.sweep --config=experiments/mup_vs_sp.py --workdir=DIR)")
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    if parameterization == "mup":
        narrowest = grid[min(grid)]
        base_lr = min(narrowest, key=lambda lr: narrowest[lr].loss)
        chosen = {width: by_lr.get(base_lr) for width, by_lr in grid.items()}
        rule = f"muP: base learning rate {base_lr:g}, the best at the narrowest width, kept at every width."
    else:
        chosen = {width: min(by_lr.values(), key=lambda r: r.loss) for width, by_lr in grid.items()}
        rule = "SP: the best learning rate of each width."
    lines = [rule, "", "| width | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " | best LR |",
             "|---" * (len(lrs) + 2) + "|"]
    for width in sorted(grid):
        by_lr = grid[width]
        cells = ["—" if lr not in by_lr else
                 (f"**{by_lr[lr].loss:.4f}**" if by_lr[lr] is chosen[width] else f"{by_lr[lr].loss:.4f}")
                 for lr in lrs]
        best = min(by_lr, key=lambda lr: by_lr[lr].loss)
        lines.append(f"| {width} | " + " | ".join(cells) + f" | {best:g} |")
    edge = sorted(width for width, by_lr in grid.items() if min(by_lr, key=lambda lr: by_lr[lr].loss) in (lrs[0], lrs[-1]))
    if edge:
        lines += ["", f"The best learning rate is at the edge of the grid for width {', '.join(map(str, edge))}: "
                      f"the optimum may lie beyond it."]
    missing = sorted(width for width, run in chosen.items() if run is None)
    if missing:
        lines += ["", f"No usable run at the chosen learning rate for width {', '.join(map(str, missing))}."]
    return [run for run in chosen.values() if run is not None], lines


def analyze(workdir: Path, *, experiment: str | None = None, flops: str = "cerebras",
            params: str = "non_embedding", n_bootstrap: int = 1000, seed: int = 0) -> GroupedAnalysis:
    runs = select_group(collect_runs(workdir), experiment)
    by_param: dict[str, list[Run]] = {}
    for run in runs:
        by_param.setdefault(str(config_value(run, GROUP_BY) or "sp"), []).append(run)
    chosen, notes = {}, ["## How the learning rates were chosen", "",
                         "Final validation loss of every run; **bold**: the runs fitted.", ""]
    for param in sorted(by_param):
        chosen[param], lines = choose(by_param[param], param)
        notes += lines + [""]
    grouped = compare_groups(workdir, runs[0].group, GROUP_BY, chosen, flops, params, n_bootstrap, seed)
    grouped.notes = notes
    return grouped


def main(argv: list[str]) -> None:
    from cgpt_jax.scaling.report import write_grouped_and_describe  # matplotlib: the command only

    if len(argv) != 2:
        raise app.UsageError("usage: python -m cgpt_jax.scaling.mup_vs_sp DIR [--out=DIR]")
    workdir, args = storage.path(argv[1]), flags.FLAGS
    try:
        grouped = analyze(workdir, experiment=args.experiment)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    print(write_grouped_and_describe(grouped, storage.path(args.out) if args.out else workdir))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module (tests) defines none.
    flags.DEFINE_string("out", None, "Where to write report.md, fit.json and scaling.png; default: DIR.")
    flags.DEFINE_string("experiment", None, "When DIR mixes sweeps: a prefix of the one to read.")
    cli.run(main)
