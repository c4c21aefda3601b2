"""From a sweep workdir to fitted laws: choose the runs, fit, backtest, and extrapolate to budgets."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from cgpt_jax.scaling import fits
from cgpt_jax.scaling.reference import CerebrasReference, load_cerebras
from cgpt_jax.scaling.results import FLOP_CONVENTIONS, PARAM_COUNTS, Run, collect_runs, select_group
from cgpt_jax.storage import Path

# A sweep "varies D" when its tokens-per-parameter ratios spread wider than this factor.
_RATIO_SPREAD = 1.25
# Runs of one isoFLOP budget spend it to within the rounding of their step counts; budgets lie further apart.
_BUDGET_SPREAD = 1.1
BUDGET_MULTIPLES = (1, 10, 100, 1000)
# Huber's delta above every log-residual: the fit is then plain least squares, the objective that reproduces
# the published Eq. 1's residuals (docs/scaling.md).
LEAST_SQUARES_DELTA = 1.0  # budgets reported, as multiples of the largest run's compute


@dataclasses.dataclass
class LawFit:
    fit: fits.FitResult
    runs: list[str]  # the runs it was fitted to
    backtest: dict | None  # fit without the largest-compute run, predict it
    note: str = ""

    def summary(self) -> dict:
        return {**self.fit.summary(), "runs": self.runs, "backtest": self.backtest, "note": self.note}


@dataclasses.dataclass
class Analysis:
    workdir: Path
    group: str
    runs: list[Run]  # every run of the group, usable or not
    flops: str  # FLOP convention of the compute axis
    params: str  # 'non_embedding' | 'total'
    compute_law: LawFit | None
    chinchilla_law: LawFit | None
    isoflop: fits.IsoflopFit | None  # approach 2: the loss minimum of each compute budget
    allocation: dict | None  # compute-optimal N, D and D/N by approaches 2 and 3 (isoFLOP sweeps)
    notes: list[str]  # why a law was not fitted, how points were chosen
    monotonic: dict  # does the loss fall with compute along the L(C) points
    budgets: list[dict]
    reference: CerebrasReference | None
    reference_fit: fits.FitResult | None  # our fitter on the published points
    reference_ls_fit: fits.FitResult | None  # the same points by least squares on log-loss (Huber delta = 1)

    @property
    def usable(self) -> list[Run]:
        return [r for r in self.runs if r.usable]

    def compute(self, run: Run) -> float:
        return run.flops[self.flops]


def _pareto_front(runs: list[Run], flops: str) -> list[Run]:
    """Runs that no cheaper run beats: the compute-optimal frontier of an isoFLOP-style sweep."""
    front, best = [], math.inf
    for run in sorted(runs, key=lambda r: r.flops[flops]):
        if run.loss < best:
            front.append(run)
            best = run.loss
    return front


def _backtest(fit_fn, inputs: list[np.ndarray], loss: np.ndarray, compute: np.ndarray, n_params: int,
              predict) -> dict | None:
    if len(loss) - 1 < n_params:
        return None
    held = int(np.argmax(compute))
    keep = np.arange(len(loss)) != held
    fit = fit_fn(*(x[keep] for x in inputs), loss[keep], n_bootstrap=0)
    predicted = float(predict(fit.constants, *(x[held] for x in inputs)))
    return {"held_out_compute": float(compute[held]), "observed": float(loss[held]), "predicted": predicted,
            "rel_error": (predicted - float(loss[held])) / float(loss[held]), "constants": fit.constants}


def isoflop_budgets(runs: list[Run], flops: str) -> list[list[Run]]:
    """Runs grouped by compute budget: sorted by compute, a new budget where compute jumps by > 10%."""
    budgets: list[list[Run]] = []
    for run in sorted(runs, key=lambda r: r.flops[flops]):
        if budgets and run.flops[flops] <= _BUDGET_SPREAD * budgets[-1][0].flops[flops]:
            budgets[-1].append(run)
        else:
            budgets.append([run])
    return budgets


def _isoflop_fit(usable: list[Run], flops: str, params: str, n_bootstrap: int, seed: int,
                 notes: list[str]) -> fits.IsoflopFit | None:
    budgets = [b for b in isoflop_budgets(usable, flops) if len(b) >= 3]
    if len(budgets) < 2:
        notes.append("Approach 2 (a parabola per compute budget) needs at least 2 budgets of 3 or more runs "
                     f"of equal compute ({len(budgets)} found).")
        return None
    arrays = [(np.array([r.flops[flops] for r in b]), np.array([r.params(params) for r in b]),
               np.array([r.tokens for r in b]), np.array([r.loss for r in b])) for b in budgets]
    return fits.fit_isoflop_minima(arrays, n_bootstrap=n_bootstrap, seed=seed)


def _allocation(usable: list[Run], flops: str, params: str, isoflop: fits.IsoflopFit | None,
                chinchilla_law: LawFit | None) -> dict | None:
    """Compute-optimal tokens per parameter at the sweep's budgets: approach 2 (the parabolas' minima) and
    approach 3 (the optimum of L(N, D) under C = kappa·N·D), each with its 95% bootstrap interval."""
    if isoflop is None:
        return None
    out = {"approach2": isoflop.summary(), "approach3": None}
    if chinchilla_law is None:
        return out
    kappa = float(np.median([r.flops[flops] / (r.params(params) * r.tokens) for r in usable]))
    fit = chinchilla_law.fit
    keys = list(fit.constants)
    samples = [fit.constants] + ([dict(zip(keys, s)) for s in fit.samples] if fit.samples is not None else [])
    log_ratio = np.array([np.log(d / n) for n, d in (fits.chinchilla_optimum(k, isoflop.compute, kappa)
                                                      for k in samples)])  # [1 + n_bootstrap, K]
    exponents = np.array([k["beta"] / (k["alpha"] + k["beta"]) for k in samples])
    approach3 = {"kappa": kappa, "n_exponent": float(exponents[0]),
                 "tokens_per_param": float(np.exp(log_ratio[0].mean())),
                 "budgets": [{"compute": float(c), "tokens_per_param": float(np.exp(log_ratio[0, k]))}
                             for k, c in enumerate(isoflop.compute)]}
    if fit.samples is not None:
        approach3["n_exponent_ci95"] = fits.interval(exponents[1:])
        approach3["tokens_per_param_ci95"] = fits.interval(np.exp(log_ratio[1:].mean(axis=1)))
        for k, row in enumerate(approach3["budgets"]):
            row["tokens_per_param_ci95"] = fits.interval(np.exp(log_ratio[1:, k]))
    out["approach3"] = approach3
    return out


def _monotonic(runs: list[Run], flops: str) -> dict:
    ordered = sorted(runs, key=lambda r: r.flops[flops])
    violations = [f"{b.name} ({b.loss:.4g}) is not below {a.name} ({a.loss:.4g})"
                  for a, b in itertools.pairwise(ordered) if b.loss >= a.loss]
    return {"monotonic": not violations, "violations": violations}


def check_axes(flops: str, params: str) -> None:
    if flops not in FLOP_CONVENTIONS:
        raise ValueError(f"--flops={flops!r}: choose one of {FLOP_CONVENTIONS}")
    if params not in PARAM_COUNTS:
        raise ValueError(f"--params={params!r}: choose one of {PARAM_COUNTS}")


def analyze(workdir: Path, *, experiment: str | None = None, flops: str = "cerebras",
            params: str = "non_embedding", reference: str | None = None, reference_path: Path | None = None,
            n_bootstrap: int = 1000, seed: int = 0) -> Analysis:
    check_axes(flops, params)
    if reference not in (None, "cerebras"):
        raise ValueError(f"--reference={reference!r}: the only reference is 'cerebras'")
    ref = load_cerebras(reference_path) if reference == "cerebras" else None
    runs = select_group(collect_runs(workdir), experiment)
    analysis = fit_runs(workdir, runs, flops, params, n_bootstrap, seed)
    if ref is not None:
        analysis.reference = ref
        analysis.reference_fit = fits.fit_compute_law(ref.flops, ref.loss, n_bootstrap=n_bootstrap, seed=seed)
        analysis.reference_ls_fit = fits.fit_compute_law(ref.flops, ref.loss, n_bootstrap=0, delta=LEAST_SQUARES_DELTA)
    return analysis


def fit_runs(workdir: Path, runs: list[Run], flops: str, params: str, n_bootstrap: int,
             seed: int) -> Analysis:
    """Fit the laws the runs of one recipe identify; ValueError when they are too few to fit any."""
    usable = [r for r in runs if r.usable]
    if not usable:
        listing = "\n".join(f"  {r.name}: {'; '.join(r.problems)}" for r in runs)
        raise ValueError(f"{workdir} has no finished run to fit:\n{listing}")
    notes: list[str] = []

    ratios = [r.tokens / r.params(params) for r in usable]
    # A ladder at fixed tokens per total parameter has varying tokens per non-embedding parameter (and
    # vice versa), so D counts as varied only when neither parameter count gives a fixed ratio.
    varies_d = all(max(s) / min(s) > _RATIO_SPREAD
                   for s in ([r.tokens / r.params(count) for r in usable] for count in PARAM_COUNTS))
    if varies_d:
        compute_runs = _pareto_front(usable, flops)
        notes.append(f"The sweep varies tokens per parameter ({min(ratios):.3g} to {max(ratios):.3g}), so L(C) "
                     f"is fitted to the {len(compute_runs)} runs on the compute-optimal frontier (no cheaper "
                     f"run has a lower loss).")
    else:
        compute_runs = sorted(usable, key=lambda r: r.flops[flops])
        notes.append("The sweep keeps tokens per parameter fixed, so L(N, D) is not identifiable from it; vary "
                     "tokens per parameter (e.g. experiments/cpu_isoflop.py) to fit it.")

    compute_law = None
    if len(compute_runs) >= 3:
        c = np.array([r.flops[flops] for r in compute_runs])
        loss = np.array([r.loss for r in compute_runs])
        fit = fits.fit_compute_law(c, loss, n_bootstrap=n_bootstrap, seed=seed)
        compute_law = LawFit(fit=fit, runs=[r.name for r in compute_runs],
                             backtest=_backtest(fits.fit_compute_law, [c], loss, c, 3, fits.predict_compute_law))
    else:
        notes.append(f"L(C) has 3 constants and needs at least 3 runs ({len(compute_runs)} available).")

    chinchilla_law = None
    if varies_d and len(usable) >= 5:
        n = np.array([r.params(params) for r in usable])
        d = np.array([r.tokens for r in usable])
        c = np.array([r.flops[flops] for r in usable])
        loss = np.array([r.loss for r in usable])
        fit = fits.fit_chinchilla_law(n, d, loss, n_bootstrap=n_bootstrap, seed=seed)
        chinchilla_law = LawFit(fit=fit, runs=[r.name for r in usable],
                                backtest=_backtest(fits.fit_chinchilla_law, [n, d], loss, c, 5,
                                                   fits.predict_chinchilla_law))
    elif varies_d:
        notes.append(f"L(N, D) has 5 constants and needs at least 5 runs ({len(usable)} available).")
    isoflop = _isoflop_fit(usable, flops, params, n_bootstrap, seed, notes) if varies_d else None
    if compute_law is None and chinchilla_law is None and isoflop is None:
        raise ValueError(f"{workdir}: too few usable runs to fit any law ({len(usable)} usable of {len(runs)}). "
                         + " ".join(notes))

    for law in (compute_law, chinchilla_law):
        if law is not None and law.fit.ci is None:
            law.note = (f"{law.fit.n_points} points for {len(law.fit.constants)} constants: the fit interpolates, "
                        f"so there are no confidence intervals; add runs.")
        if law is not None and law.fit.at_bound:
            law.note += f" Constants {law.fit.at_bound} ended on a bound of the search: not identified by these runs."

    return Analysis(workdir=workdir, group=runs[0].group, runs=runs, flops=flops, params=params,
                    compute_law=compute_law, chinchilla_law=chinchilla_law, isoflop=isoflop,
                    allocation=_allocation(usable, flops, params, isoflop, chinchilla_law), notes=notes,
                    monotonic=_monotonic(compute_runs, flops),
                    budgets=_budgets(usable, compute_runs, flops, params, compute_law, chinchilla_law),
                    reference=None, reference_fit=None, reference_ls_fit=None)


def _budgets(usable: list[Run], compute_runs: list[Run], flops: str, params: str, compute_law: LawFit | None,
             chinchilla_law: LawFit | None) -> list[dict]:
    """Loss and (N, D) at multiples of the largest run's compute."""
    c_max = max(r.flops[flops] for r in usable)
    rows = []
    if chinchilla_law is not None:
        # C = kappa·N·D; kappa is 6 for the 6N convention and is read off the runs for the others.
        kappa = float(np.median([r.flops[flops] / (r.params(params) * r.tokens) for r in usable]))
    else:
        # A fixed-ratio ladder cannot locate the optimum: report where its own allocation rule leads.
        log_c = np.log([r.flops[flops] for r in compute_runs])
        n_fit = np.polyfit(log_c, np.log([r.params(params) for r in compute_runs]), 1)
        d_fit = np.polyfit(log_c, np.log([r.tokens for r in compute_runs]), 1)
    for multiple in BUDGET_MULTIPLES:
        budget = c_max * multiple
        row: dict = {"compute": budget, "multiple_of_largest_run": multiple}
        if compute_law is not None:
            row["loss_L(C)"] = float(fits.predict_compute_law(compute_law.fit.constants, budget))
            if compute_law.fit.samples is not None:
                keys = list(compute_law.fit.constants)
                preds = [fits.predict_compute_law(dict(zip(keys, s)), budget) for s in compute_law.fit.samples]
                row["loss_L(C)_ci95"] = [float(v) for v in np.quantile(preds, [0.025, 0.975])]
        if chinchilla_law is not None:
            n_opt, d_opt = fits.chinchilla_optimum(chinchilla_law.fit.constants, budget, kappa)
            row.update(allocation=f"optimum of L(N,D) with C = kappa·N·D, kappa = {kappa:.3g} (median over runs)", kappa=kappa, n_params=float(n_opt),
                       tokens=float(d_opt),
                       loss_L_N_D=float(fits.predict_chinchilla_law(chinchilla_law.fit.constants, n_opt, d_opt)))
        else:
            row.update(allocation="the sweep's own N(C), D(C) trend (not an optimum)",
                       n_params=float(np.exp(np.polyval(n_fit, math.log(budget)))),
                       tokens=float(np.exp(np.polyval(d_fit, math.log(budget)))))
        rows.append(row)
    return rows
