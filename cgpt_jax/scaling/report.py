"""Writing an analysis out: fit.json (everything, machine-readable), report.md and scaling.png; for a single
curve and for a sweep split into groups (one curve per group in one plot, and a comparison table)."""
from __future__ import annotations

import json
import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from cgpt_jax import storage
from cgpt_jax.scaling import fits
from cgpt_jax.scaling.analysis import LEAST_SQUARES_DELTA, Analysis, isoflop_budgets
from cgpt_jax.scaling.groups import GroupedAnalysis
from cgpt_jax.storage import Path


def _clean(value):
    """JSON without NaN/Infinity (strict readers reject them): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def fit_json(analysis: Analysis) -> dict:
    a = analysis
    return _clean({
        "workdir": str(a.workdir), "group": a.group, "flops_convention": a.flops, "param_count": a.params,
        "runs": [{"name": r.name, "status": r.status, "usable": r.usable, "problems": r.problems,
                  "final_eval_loss": r.loss, "n_params": r.n_params,
                  "n_params_non_embedding": r.n_params_non_embedding, "tokens": r.tokens, "flops": r.flops}
                 for r in a.runs],
        "excluded": {r.name: r.problems for r in a.runs if not r.usable},
        "fits": {law.fit.law: law.summary() for law in (a.compute_law, a.chinchilla_law) if law is not None},
        "notes": a.notes, "monotonic": a.monotonic, "budgets": a.budgets, "compute_optimal": a.allocation,
        "reference": None if a.reference is None else {
            **a.reference.summary(), "our_fit_to_published_points": a.reference_fit.summary(),
            "least_squares_fit_to_published_points": a.reference_ls_fit.summary(),
            "residuals": _reference_residuals(a)},
    })


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}"


def _constants_table(fit: fits.FitResult, published: dict[str, float] | None = None) -> list[str]:
    """Markdown rows: constant, fitted value, 95% interval (and the published value when given)."""
    head = "| constant | fit | 95% CI |" + (" published |" if published else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, value in fit.constants.items():
        ci = f"[{_fmt(fit.ci[name][0])}, {_fmt(fit.ci[name][1])}]" if fit.ci else "—"
        row = f"| {name} | {_fmt(value)} | {ci} |"
        if published:
            row += f" {_fmt(published.get(name))} |"
        lines.append(row)
    return lines


def _interval(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "—"


def _reference_residuals(a: Analysis) -> dict[str, dict[str, float]]:
    """Relative residual (prediction - loss) / loss of each published point under Eq. 1 and the two refits."""
    laws = {"eq1": a.reference.law, "huber": a.reference_fit.constants, "least_squares": a.reference_ls_fit.constants}
    loss = np.array(a.reference.loss)
    return {name: dict(zip(a.reference.names, (fits.predict_compute_law(k, a.reference.flops) - loss) / loss))
            for name, k in laws.items()}


def _reference_residuals_md(a: Analysis) -> list[str]:
    res = _reference_residuals(a)
    ls = a.reference_ls_fit.constants
    out = [(f"The objectives differ. This fitter minimises a Huber loss with delta = {a.reference_fit.huber_delta:g} "
            f"on log-loss residuals (Besiroglu et al. 2024); residuals of about 1% are far beyond delta, so it "
            f"behaves as least absolute deviations: it passes (almost) through some points and leaves the misfit "
            f"on a few. Eq. 1 spreads its misfit over all seven points as least squares does: least squares on "
            f"log-loss (delta = {LEAST_SQUARES_DELTA:g}) reproduces its residuals, with a = {ls['a']:.3g}, "
            f"b = {ls['b']:.4g}, c = {ls['c']:.3g}. Residuals (prediction - loss) / loss:"), "",
           "| model | Pile loss | Eq. 1 | this fitter (Huber) | least squares |", "|---|---|---|---|---|"]
    for name, loss in zip(a.reference.names, a.reference.loss):
        out.append(f"| {name} | {loss:.4g} | " + " | ".join(_percent(res[k][name]) for k in res) + " |")
    out.append("| max abs. | | " + " | ".join(f"{100 * max(abs(v) for v in res[k].values()):.2f}%" for k in res)
               + " |")
    return out


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}%"


def _allocation_md(a: Analysis) -> list[str]:
    """The compute-optimal tokens per parameter by Chinchilla's approaches 2 and 3, set against 20."""
    two, three = a.allocation["approach2"], a.allocation["approach3"]
    out = ["## Compute-optimal allocation (Chinchilla approaches 2 and 3)", "",
           (f"Approach 2: at each compute budget a parabola of loss in log N through its runs; its vertex is "
            f"N_opt, and D_opt lies on the budget's own N-D line. Approach 3: the optimum of the L(N, D) fit under "
            f"C = kappa·N·D. N counts {a.params.replace('_', '-')} parameters. 95% intervals from residual-"
            f"bootstrap refits. Cerebras-GPT (after Chinchilla) trains at 20 tokens per parameter."), "",
           "| budget C | runs | N_opt (2) | N_opt 95% CI | D_opt/N_opt (2) | 95% CI | vertex inside the sizes | "
           "D_opt/N_opt (3) | 95% CI |", "|---|---|---|---|---|---|---|---|---|"]
    for k, row in enumerate(two["budgets"]):
        row3 = three["budgets"][k] if three else {}
        out.append(f"| {_fmt(row['compute'])} | {row['runs']} | {_fmt(row['n_opt'])} | "
                   f"{_interval(row.get('n_opt_ci95'))} | {_fmt(row['tokens_per_param'])} | "
                   f"{_interval(row.get('tokens_per_param_ci95'))} | {'yes' if row['inside'] else '**no**'} | "
                   f"{_fmt(row3.get('tokens_per_param'))} | {_interval(row3.get('tokens_per_param_ci95'))} |")
    out += ["", (f"Compute-optimal tokens per parameter over these budgets (geometric mean): approach 2 "
                 f"{_fmt(two['tokens_per_param'])} {_interval(two.get('tokens_per_param_ci95'))}"
                 + (f", approach 3 {_fmt(three['tokens_per_param'])} {_interval(three.get('tokens_per_param_ci95'))}"
                    if three else "") + "; the published rule: 20."),
            (f"N_opt ∝ C^a: approach 2 a = {_fmt(two['n_exponent'])} {_interval(two.get('n_exponent_ci95'))}"
             + (f", approach 3 a = beta/(alpha+beta) = {_fmt(three['n_exponent'])} "
                f"{_interval(three.get('n_exponent_ci95'))}" if three else "")
             + " (Chinchilla: about 0.5, so that D/N stays constant).")]
    if two.get("no_minimum_fraction"):
        out.append(f"{100 * two['no_minimum_fraction']:.1f}% of the bootstrap parabolas opened downward (no minimum); "
                   f"the intervals are over the others.")
    if not all(row["inside"] for row in two["budgets"]):
        out.append("A vertex outside its budget's sizes is an extrapolation: add sizes on that side.")
    return out + [""]


def report_md(analysis: Analysis) -> str:
    a = analysis
    out = [f"# Scaling-law report: {a.workdir}", "",
           (f"Runs: {a.group}. Compute axis: training FLOPs, `{a.flops}` convention (cgpt_jax.flops). "
            f"N: {a.params.replace('_', '-')} parameters. Loss: final validation loss (nats/token)."), "",
           "## Runs", "", "| run | status | N total | N non-emb. | tokens D | compute C | loss | notes |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(a.runs, key=lambda r: r.flops.get(a.flops, math.inf)):
        out.append(f"| {r.name} | {'used' if r.usable else r.status} | {_fmt(r.n_params)} | "
                   f"{_fmt(r.n_params_non_embedding)} | {_fmt(r.tokens)} | {_fmt(r.flops.get(a.flops))} | "
                   f"{_fmt(r.loss)} | {'; '.join(r.problems)} |")
    excluded = [r for r in a.runs if not r.usable]
    out += ["", f"{len(a.usable)} of {len(a.runs)} runs are fitted"
            + (f"; excluded: {', '.join(r.name for r in excluded)} (reasons above)." if excluded else "."), ""]
    out += [f"- {note}" for note in a.notes]
    mono = a.monotonic
    out += ["", "Loss falls monotonically with compute along the L(C) points: "
            + ("yes." if mono["monotonic"] else "**no**: " + "; ".join(mono["violations"]) + "."), ""]

    for law in (a.compute_law, a.chinchilla_law):
        if law is None:
            continue
        fit = law.fit
        out += [f"## {fit.formula}", "", (f"Fitted to {fit.n_points} runs ({', '.join(law.runs)}): Huber loss "
                                          f"(delta={fit.huber_delta}) on log-loss, many starts, bounds; 95% "
                                          f"intervals from {0 if fit.samples is None else len(fit.samples)} "
                                          f"residual-bootstrap refits."), ""]
        out += _constants_table(fit)
        out += ["", f"R² (on the loss) = {fit.r2:.4f}; relative residual std = {100 * fit.rel_residual_std:.2f}%."]
        if law.note:
            out += ["", law.note.strip()]
        bt = law.backtest
        if bt is None:
            out += ["", "Backtest: not possible (too few runs to refit without the largest)."]
        else:
            out += ["", (f"Backtest: fitted without the largest run (C = {_fmt(bt['held_out_compute'])}), the "
                         f"law predicts {bt['predicted']:.4f} against the observed {bt['observed']:.4f}: error "
                         f"{100 * bt['rel_error']:+.2f}%.")]
        out.append("")

    if a.allocation is not None:
        out += _allocation_md(a)
    out += ["## Budgets", "", f"N and D: {a.budgets[0]['allocation']}.", "",
            "| compute C | × largest run | L(C) | L(C) 95% CI | N | D | L(N,D) at N, D |", "|---|---|---|---|---|---|---|"]
    for row in a.budgets:
        ci = row.get("loss_L(C)_ci95")
        out.append(f"| {_fmt(row['compute'])} | {row['multiple_of_largest_run']} | {_fmt(row.get('loss_L(C)'))} | "
                   f"{f'[{_fmt(ci[0])}, {_fmt(ci[1])}]' if ci else '—'} | {_fmt(row['n_params'])} | "
                   f"{_fmt(row['tokens'])} | {_fmt(row.get('loss_L_N_D'))} |")

    if a.reference is not None:
        ref, rfit = a.reference, a.reference_fit
        out += ["", "## Reference: Cerebras-GPT (Dey et al. 2023, Eq. 1)", "",
                (f"Published points (Pile test loss vs the paper's training FLOPs) from {ref.path}. "
                 f"The same fitter applied to them:"), ""]
        out += _constants_table(rfit, ref.law)
        inside = [k for k, v in ref.law.items() if rfit.ci and rfit.ci[k][0] <= v <= rfit.ci[k][1]]
        out += ["", (f"Published constants inside our 95% intervals: {len(inside)} of 3 ({', '.join(inside)}). "
                     f"R² = {rfit.r2:.4f}."), ""]
        out += _reference_residuals_md(a)
        if a.compute_law is not None:
            b, ci = a.compute_law.fit.constants["b"], a.compute_law.fit.ci
            out += ["", f"Exponent b of this sweep: {b:.4g}"
                    + (f" [{ci['b'][0]:.4g}, {ci['b'][1]:.4g}]" if ci else "")
                    + f"; Cerebras-GPT: {ref.law['b']:.4g}. Losses are on different data, vocabularies and "
                    f"scales, so only the shape (a power law in compute) is comparable."]
    out += ["", "Files: fit.json (all numbers), scaling.png (the plot).", ""]
    return "\n".join(out)


def _curve_band(fit: fits.FitResult, xs: np.ndarray):
    keys = list(fit.constants)
    preds = np.array([fits.predict_compute_law(dict(zip(keys, s)), xs) for s in fit.samples])
    return np.quantile(preds, [0.025, 0.975], axis=0)


def scaling_plot(analysis: Analysis, path: Path) -> None:
    a = analysis
    fig = Figure(figsize=(8, 5.5))  # no pyplot: no backend or display needed, no global state
    ax = fig.subplots()
    used = [r for r in a.runs if r.usable]
    shown = [r for r in a.runs if r.loss is not None and math.isfinite(r.loss)]
    c_all = [r.flops[a.flops] for r in shown]
    xs = np.logspace(math.log10(min(c_all) / 1.5), math.log10(max(c_all) * 10), 200)
    curves: list[np.ndarray] = []
    ax.scatter([r.flops[a.flops] for r in used], [r.loss for r in used], color="C0", zorder=3, label="runs (fitted)")
    for r in used:
        ax.annotate(r.name, (r.flops[a.flops], r.loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    flagged = [r for r in shown if not r.usable]
    if flagged:
        ax.scatter([r.flops[a.flops] for r in flagged], [r.loss for r in flagged], marker="x", color="gray",
                   zorder=3, label="runs (excluded)")
    if a.compute_law is not None:
        fit = a.compute_law.fit
        k = fit.constants
        curves.append(fits.predict_compute_law(k, xs))
        ax.plot(xs, curves[-1], color="C0",
                label=f"fit: (C/{k['a']:.3g})^{k['b']:.3g} + {k['c']:.3g}")
        if fit.samples is not None:
            lo, hi = _curve_band(fit, xs)
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.15, label="95% band")
    if a.chinchilla_law is not None:
        kappa = a.budgets[0]["kappa"]
        n_opt, d_opt = fits.chinchilla_optimum(a.chinchilla_law.fit.constants, xs, kappa)
        curves.append(fits.predict_chinchilla_law(a.chinchilla_law.fit.constants, n_opt, d_opt))
        ax.plot(xs, curves[-1], color="C2",
                linestyle="--", label="L(N,D) at its compute-optimal N, D")
    ax.set_xscale("log")
    ax.set_xlabel(f"training FLOPs ({a.flops} convention)")
    ax.set_ylabel("final validation loss (nats/token)")
    handles, labels = ax.get_legend_handles_labels()
    losses = [r.loss for r in shown] + [float(v) for curve in curves for v in curve]
    if a.reference is not None:
        ref = a.reference
        ax_ref = ax.twiny()  # the published runs on their own FLOP axis, sharing the loss axis
        ref_xs = np.logspace(math.log10(min(ref.flops) / 1.5), math.log10(max(ref.flops) * 10), 200)
        ax_ref.plot(ref_xs, fits.predict_compute_law(ref.law, ref_xs), color="C1", linestyle=":",
                    label=f"Cerebras-GPT Eq. 1: (C/{ref.law['a']:.3g})^{ref.law['b']:.3g} + {ref.law['c']:.3g}")
        ax_ref.scatter(ref.flops, ref.loss, marker="s", color="C1", label="Cerebras-GPT 111M-13B (Pile test)")
        ax_ref.set_xscale("log")
        ax_ref.set_xlabel("Cerebras-GPT training FLOPs (paper's convention)", color="C1")
        ax_ref.tick_params(axis="x", colors="C1")
        h2, l2 = ax_ref.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        losses += ref.loss
    # Log loss axis with plain numbers; limits set here because twin axes autoscale separately.
    ax.set_yscale("log")
    ax.set_ylim(min(losses) / 1.08, max(losses) * 1.08)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=120)


def isoflop_plot(analysis: Analysis, path: Path) -> None:
    """Left: loss against N per budget with its parabola and vertex. Right: D_opt/N_opt against compute."""
    a = analysis
    fig = Figure(figsize=(12, 5))
    ax, ax_r = fig.subplots(1, 2)
    two, three = a.allocation["approach2"], a.allocation["approach3"]
    budgets = [b for b in isoflop_budgets(a.usable, a.flops) if len(b) >= 3]
    for k, (runs, row) in enumerate(zip(budgets, two["budgets"])):
        n = np.array([r.params(a.params) for r in runs])
        loss = np.array([r.loss for r in runs])
        xs = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 100)
        ax.scatter(n, loss, color=f"C{k}", zorder=3, label=f"C = {row['compute']:.2g}")
        ax.plot(np.exp(xs), np.polyval(np.polyfit(np.log(n), loss, 2), xs), color=f"C{k}", linewidth=1)
        if math.isfinite(row["n_opt"]):
            ax.plot([row["n_opt"]], [row["loss_opt"]], "*", color=f"C{k}", markersize=13, markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({a.params.replace('_', '-')} parameters)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("approach 2: a parabola per budget, its vertex (star) is N_opt", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)

    compute = np.array([row["compute"] for row in two["budgets"]])
    ratio = np.array([row["tokens_per_param"] for row in two["budgets"]])
    cis = [row.get("tokens_per_param_ci95") or [r, r] for row, r in zip(two["budgets"], ratio)]
    err = np.abs(np.array(cis).T - ratio)
    ax_r.errorbar(compute, ratio, yerr=err, fmt="o", color="C0", capsize=4, label="approach 2 (95% CI)")
    if three is not None:
        xs = np.logspace(math.log10(compute.min() / 2), math.log10(compute.max() * 2), 50)
        chin = a.chinchilla_law.fit.constants
        n_opt, d_opt = fits.chinchilla_optimum(chin, xs, three["kappa"])
        ax_r.plot(xs, d_opt / n_opt, color="C2", label="approach 3: optimum of L(N, D)")
    ax_r.axhline(20, color="C1", linestyle=":", label="20 tokens/parameter (Cerebras-GPT, Chinchilla)")
    ax_r.set_xscale("log")
    ax_r.set_yscale("log")
    ax_r.set_xlabel(f"training FLOPs ({a.flops} convention)")
    ax_r.set_ylabel("compute-optimal tokens per parameter")
    ax_r.legend(fontsize=8)
    ax_r.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=110)


def write_outputs(analysis: Analysis, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fit": out_dir / "fit.json", "report": out_dir / "report.md", "plot": out_dir / "scaling.png"}
    storage.write_atomically(paths["fit"], json.dumps(fit_json(analysis), indent=1) + "\n")
    storage.write_atomically(paths["report"], report_md(analysis))
    scaling_plot(analysis, paths["plot"])
    if analysis.allocation is not None:
        paths["isoflop_plot"] = out_dir / "isoflop.png"
        isoflop_plot(analysis, paths["isoflop_plot"])
    return paths


def grouped_fit_json(grouped: GroupedAnalysis) -> dict:
    g = grouped
    return _clean({
        "workdir": str(g.workdir), "group": g.experiment, "group_by": g.group_by, "flops_convention": g.flops,
        "param_count": g.params, "common_compute": g.common_compute, "comparison": g.comparison, "notes": g.notes,
        "groups": {group.value: (fit_json(group.analysis) if group.analysis is not None else
                                 {"runs": [r.name for r in group.runs], "problem": group.problem})
                   for group in g.groups},
    })


def grouped_report_md(grouped: GroupedAnalysis) -> str:
    g = grouped
    field = f"`{g.group_by}`"
    out = [f"# Scaling comparison by {field}: {g.workdir}", "",
           (f"Runs: {g.experiment}, split by {field} into {len(g.groups)} groups. Compute axis: training FLOPs, "
            f"`{g.flops}` convention (cgpt_jax.flops). Loss: final validation loss (nats/token). Each group gets "
            f"its own L(C) = (C/a)^b + c, fitted as a single sweep is (Huber loss on log-loss, residual-bootstrap "
            f"95% intervals)."), "",
           "## Comparison", "",
           (f"C* = {_fmt(g.common_compute)} FLOPs is the largest compute every fitted group reaches (the smallest "
            f"of the groups' largest runs). Measured: the group's run nearest C*; fitted: its L(C) at C*. "
            f"tokens/s: mean training throughput of the group's finished runs (summary.json)."), "",
           (f"| {g.group_by} | runs fitted | b | b 95% CI | R² | residual spread | backtest | measured loss (run, C) "
            f"| L(C*) | L(C*) 95% CI | tokens/s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in g.comparison:
        speed = "—" if row["tokens_per_sec_mean"] is None else f"{row['tokens_per_sec_mean']:,.0f}"
        if "problem" in row:
            out.append(f"| {row['group']} | {row['fitted_runs']} of {row['runs']} | — | — | — | — | — | — | — | — "
                       f"| {speed} |")
            continue
        out.append(f"| {row['group']} | {row['fitted_runs']} of {row['runs']} | {_fmt(row['b'])} | "
                   f"{_interval(row['b_ci95'])} | {row['r2']:.4f} | {100 * row['rel_residual_std']:.2f}% | "
                   f"{_percent(row['backtest_rel_error'])} | {row['measured_loss']:.4f} "
                   f"({row['measured_run']}, {_fmt(row['measured_compute'])}) | {row['fitted_loss']:.4f} | "
                   f"{_interval(row['fitted_loss_ci95'])} | {speed} |")
    out += ["", ("Residual spread: the relative residuals' standard deviation. Backtest: the law fitted without "
                 "the group's largest run, its error on that run.")]
    if g.notes:
        out += [""] + g.notes
    unfitted = [row for row in g.comparison if "problem" in row]
    if unfitted:
        out += ["", "Not fitted:"] + [f"- {row['group']}: {row['problem']}" for row in unfitted]

    for group in g.groups:
        if group.compute_fit is None:
            continue
        a, law = group.analysis, group.analysis.compute_law
        out += ["", f"## {g.group_by} = {group.value}", "",
                f"{law.fit.formula}, fitted to {law.fit.n_points} runs ({', '.join(law.runs)}):", ""]
        out += _constants_table(law.fit)
        if law.note:
            out += ["", law.note.strip()]
        bt = law.backtest
        if bt is not None:
            out += ["", (f"Backtest: without the largest run the law predicts {bt['predicted']:.4f} against the "
                         f"observed {bt['observed']:.4f} ({100 * bt['rel_error']:+.2f}%).")]
        excluded = [r for r in a.runs if not r.usable]
        if excluded:
            out += ["", "Excluded: " + "; ".join(f"{r.name} ({', '.join(r.problems)})" for r in excluded) + "."]
        if not a.monotonic["monotonic"]:
            out += ["", "Loss does not fall monotonically with compute: " + "; ".join(a.monotonic["violations"])
                    + "."]
    out += ["", "Files: fit.json (all numbers, each group's full fit), scaling.png (the plot).", ""]
    return "\n".join(out)


_GROUP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def grouped_scaling_plot(grouped: GroupedAnalysis, path: Path) -> None:
    g = grouped
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    shown = [r for group in g.groups for r in group.runs if r.loss is not None and math.isfinite(r.loss)]
    c_all = [r.flops[g.flops] for r in shown]
    xs = np.logspace(math.log10(min(c_all) / 1.5), math.log10(max(c_all) * 1.5), 200)
    losses = [r.loss for r in shown]
    for i, group in enumerate(g.groups):
        color = f"C{i}"
        used = [r for r in group.runs if r.usable]
        if not used:
            continue
        fit = group.compute_fit
        label = f"{group.value} (not fitted)" if fit is None else f"{group.value}: b = {fit.constants['b']:.3g}"
        # A marker per group keeps groups with equal losses (e.g. variants equal to dense) both visible.
        ax.scatter([r.flops[g.flops] for r in used], [r.loss for r in used], color=color,
                   marker=_GROUP_MARKERS[i % len(_GROUP_MARKERS)], s=22, zorder=3, label=label)
        if fit is not None:
            curve = fits.predict_compute_law(fit.constants, xs)
            ax.plot(xs, curve, color=color, linewidth=1.2)
            losses += [float(v) for v in curve]
    flagged = [r for r in shown if not r.usable]
    if flagged:
        ax.scatter([r.flops[g.flops] for r in flagged], [r.loss for r in flagged], marker="x", color="gray",
                   zorder=3, label="runs (excluded)")
    ax.axvline(g.common_compute, color="gray", linestyle=":", linewidth=1, label="C* (largest common compute)")
    ax.set_xscale("log")
    ax.set_xlabel(f"training FLOPs ({g.flops} convention)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"L(C) = (C/a)^b + c per {g.group_by}", fontsize=10)
    ax.set_yscale("log")
    ax.set_ylim(min(losses) / 1.03, max(losses) * 1.03)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=120)


def comparison_lines(grouped: GroupedAnalysis) -> list[str]:
    """The comparison table in one line per group, for the commands' output."""
    lines = [f"L(C) = (C/a)^b + c per {grouped.group_by}; loss at C* = {grouped.common_compute:.4g} FLOPs:"]
    for row in grouped.comparison:
        speed = "" if row["tokens_per_sec_mean"] is None else f"; {row['tokens_per_sec_mean']:,.0f} tokens/s"
        if "problem" in row:
            lines.append(f"  {row['group']}: not fitted ({row['problem']}){speed}")
            continue
        ci = "" if row["b_ci95"] is None else f" [{row['b_ci95'][0]:.3g}, {row['b_ci95'][1]:.3g}]"
        lines.append(f"  {row['group']}: b={row['b']:.4g}{ci}; R²={row['r2']:.4f}; residual spread "
                     f"{100 * row['rel_residual_std']:.2f}%; backtest {_percent(row['backtest_rel_error'])}; "
                     f"L(C*)={row['fitted_loss']:.4f} (measured {row['measured_loss']:.4f} at {row['measured_run']})"
                     f"{speed}")
    return lines


def write_grouped_and_describe(grouped: GroupedAnalysis, out_dir: Path) -> str:
    """Write the grouped report, fit and plot; the text a command prints: the comparison and the paths."""
    paths = write_grouped_outputs(grouped, out_dir)
    return "\n".join([*comparison_lines(grouped), f"report: {paths['report']}", f"fit:    {paths['fit']}",
                      f"plot:   {paths['plot']}"])


def write_grouped_outputs(grouped: GroupedAnalysis, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fit": out_dir / "fit.json", "report": out_dir / "report.md", "plot": out_dir / "scaling.png"}
    storage.write_atomically(paths["fit"], json.dumps(grouped_fit_json(grouped), indent=1) + "\n")
    storage.write_atomically(paths["report"], grouped_report_md(grouped))
    grouped_scaling_plot(grouped, paths["plot"])
    return paths
