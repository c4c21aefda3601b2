"""One sweep split by a config field (e.g. model.attention): one L(C) per value, compared at one compute."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from cgpt_jax.scaling import fits
from cgpt_jax.scaling.analysis import Analysis, check_axes, fit_runs
from cgpt_jax.scaling.results import Run, collect_runs, config_value, select_group
from cgpt_jax.storage import Path

UNSET = "(unset)"  # the group of runs whose config does not record the grouping field


@dataclasses.dataclass
class Group:
    value: str  # the runs' value of the grouping field, as text
    runs: list[Run]
    analysis: Analysis | None  # None when the group's runs are too few to fit
    problem: str = ""  # why there is no analysis

    @property
    def compute_fit(self) -> fits.FitResult | None:
        law = None if self.analysis is None else self.analysis.compute_law
        return None if law is None else law.fit


@dataclasses.dataclass
class GroupedAnalysis:
    workdir: Path
    experiment: str  # the sweep the runs come from
    group_by: str  # the dotted config field that splits them
    flops: str
    params: str
    groups: list[Group]  # sorted by value
    common_compute: float  # the largest compute every group with an L(C) fit reaches
    comparison: list[dict]  # one row per group, in the order of `groups`
    notes: list[str] = dataclasses.field(default_factory=list)  # how the runs were chosen, for the report


def _label(value) -> str:
    if value is None:
        return UNSET
    return value if isinstance(value, str) else json.dumps(value)


def _comparison_row(group: Group, common_compute: float, flops: str) -> dict:
    # Throughput does not depend on the loss, so every finished run counts, fitted or not.
    speeds = [r.tokens_per_sec for r in group.runs
              if r.status == "finished" and r.tokens_per_sec is not None and math.isfinite(r.tokens_per_sec)]
    row: dict = {"group": group.value, "runs": len(group.runs),
                 "fitted_runs": 0 if group.analysis is None else len(group.analysis.usable),
                 "tokens_per_sec_mean": float(np.mean(speeds)) if speeds else None,
                 "tokens_per_sec_runs": len(speeds)}
    fit = group.compute_fit
    if fit is None:
        row["problem"] = group.problem or "no L(C) fit: " + " ".join(group.analysis.notes)
        return row
    usable = group.analysis.usable
    nearest = min(usable, key=lambda r: abs(math.log(r.flops[flops] / common_compute)))
    backtest = group.analysis.compute_law.backtest
    row.update(b=fit.constants["b"], b_ci95=None if fit.ci is None else list(fit.ci["b"]), r2=fit.r2,
               rel_residual_std=fit.rel_residual_std,
               backtest_rel_error=None if backtest is None else backtest["rel_error"], constants=fit.constants, measured_run=nearest.name, measured_compute=nearest.flops[flops],
               measured_loss=nearest.loss,
               fitted_loss=float(fits.predict_compute_law(fit.constants, common_compute)), fitted_loss_ci95=None)
    if fit.samples is not None:
        keys = list(fit.constants)
        preds = [fits.predict_compute_law(dict(zip(keys, s)), common_compute) for s in fit.samples]
        row["fitted_loss_ci95"] = [float(v) for v in np.quantile(preds, [0.025, 0.975])]
    return row


def analyze_groups(workdir: Path, group_by: str, *, experiment: str | None = None, flops: str = "cerebras",
                   params: str = "non_embedding", n_bootstrap: int = 1000, seed: int = 0) -> GroupedAnalysis:
    """Split the runs of one sweep by the config field `group_by` and fit each part as `analyze` fits a
    whole sweep. Groups with too few runs are kept, with the reason, but get no curve."""
    check_axes(flops, params)
    runs = select_group(collect_runs(workdir), experiment)
    values = {r.name: config_value(r, group_by) for r in runs}
    if all(v is None for v in values.values()):
        raise ValueError(f"--group_by={group_by!r}: no run records this field in config.json or sweep_run.json "
                         f"(give a dotted config field such as model.attention)")
    by_value: dict[str, list[Run]] = {}
    for run in runs:
        by_value.setdefault(_label(values[run.name]), []).append(run)
    return compare_groups(workdir, runs[0].group, group_by, by_value, flops, params, n_bootstrap, seed)


def compare_groups(workdir: Path, experiment: str, group_by: str, by_value: dict[str, list[Run]], flops: str,
                   params: str, n_bootstrap: int, seed: int) -> GroupedAnalysis:
    """Fit each value's runs as one sweep and compare the fits at their largest common compute."""
    groups = []
    for value in sorted(by_value):
        members = by_value[value]
        try:
            groups.append(Group(value, members, fit_runs(workdir, members, flops, params, n_bootstrap, seed)))
        except ValueError:  # fit_runs refuses only groups with too few usable runs
            excluded = [f"{r.name} ({'; '.join(r.problems)})" for r in members if not r.usable]
            problem = f"too few usable runs to fit ({sum(r.usable for r in members)} of {len(members)})"
            groups.append(Group(value, members, None,
                                problem=problem + (f"; excluded: {', '.join(excluded)}" if excluded else "")))
    fitted = [g for g in groups if g.compute_fit is not None]
    if not fitted:
        listing = "\n".join(f"  {group_by}={g.value}: {g.problem}" for g in groups)
        raise ValueError(f"{workdir}: no group has enough usable runs to fit L(C):\n{listing}")
    common = min(max(r.flops[flops] for r in g.analysis.usable) for g in fitted)
    return GroupedAnalysis(workdir=workdir, experiment=experiment, group_by=group_by, flops=flops,
                           params=params, groups=groups, common_compute=common,
                           comparison=[_comparison_row(g, common, flops) for g in groups])
