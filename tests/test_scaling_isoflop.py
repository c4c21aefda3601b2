"""The isoFLOP experiment: its run list, and the compute-optimal analysis of a whole sweep (approaches 2, 3)."""
import json
import math

import numpy as np
import pytest

from cgpt_jax import flops
from cgpt_jax.errors import InputError
from cgpt_jax.experiments import cpu_isoflop, cpu_ladder
from cgpt_jax.model import params_count
from cgpt_jax.scaling import fits
from cgpt_jax.scaling.analysis import analyze, isoflop_budgets
from cgpt_jax.scaling.report import write_outputs
from tests.scaling_fixtures.run_dirs import write_run

# Hoffmann et al.'s law with its exponents, scaled to CPU sizes: optimum near 20 tokens per parameter.
LAW = {"E": 1.8, "A": 44.0, "alpha": 0.35, "B": 166.0, "beta": 0.37}


def test_sweep_expands_to_budgets_of_five_sizes_around_20_tokens_per_param():
    runs = cpu_isoflop.sweep()
    assert len(runs) == len(cpu_isoflop.BUDGETS) * cpu_isoflop.SIZES_PER_BUDGET >= 15
    by_budget: dict[float, list] = {}
    for run in runs:
        config = cpu_isoflop.get_config(run["config_arg"])
        budget = float(run["config_arg"].split("budget=")[1])
        shape = flops.Shape.from_model_config(config.model, cpu_ladder.SEQ_LEN)
        t = config.train
        spent = flops.training_flops(shape, t.steps * t.global_batch_size * cpu_ladder.SEQ_LEN, "cerebras")
        assert spent == pytest.approx(budget, rel=0.02)  # whole steps spend the budget to within one step
        assert abs(t.steps - cpu_ladder.TARGET_STEPS) <= 0.15 * cpu_ladder.TARGET_STEPS  # the ladder's batch rule
        by_budget.setdefault(budget, []).append(t.steps * t.global_batch_size * cpu_ladder.SEQ_LEN
                                                / params_count(config.model))
    assert len(by_budget) >= 3
    for ratios in by_budget.values():
        assert len(ratios) == 5 and min(ratios) < 10 and max(ratios) > 40  # both sides of 20 tokens/param


def test_bad_run_arguments():
    with pytest.raises(InputError, match="unknown size"):
        cpu_isoflop.get_config("size=d7l9")
    with pytest.raises(InputError, match="positive"):
        cpu_isoflop.get_config("budget=-1")
    with pytest.raises(InputError, match="steps of d96l2"):
        cpu_isoflop.get_config("size=d96l2,budget=1e9")


@pytest.fixture(scope="module")
def isoflop_sweep(tmp_path_factory):
    """The sweep's own run list with losses from LAW (0.3% noise) in place of training."""
    workdir = tmp_path_factory.mktemp("isoflop")
    rng = np.random.default_rng(0)
    for run in cpu_isoflop.sweep():
        config = cpu_isoflop.get_config(run["config_arg"])
        t, n = config.train, params_count(config.model)
        tokens = t.steps * t.global_batch_size * cpu_ladder.SEQ_LEN
        shape = flops.Shape.from_model_config(config.model, cpu_ladder.SEQ_LEN)
        loss = fits.predict_chinchilla_law(LAW, n, tokens) * math.exp(rng.normal(0, 0.003))
        write_run(workdir, run["name"], n_params=n, tokens=tokens, loss=float(loss),
                  flops=flops.training_flops(shape, tokens, "cerebras"), experiment="experiments/cpu_isoflop.py")
    return workdir


def _law_minimum_along(runs) -> float:
    """log(D/N) at the minimum of LAW along a budget's own N-D line (the FLOP count's, through its runs)."""
    log_n = np.log([r.n_params for r in runs])
    line = np.polyfit(log_n, np.log([r.tokens for r in runs]), 1)
    grid = np.linspace(log_n.min(), log_n.max(), 20_001)
    best = grid[np.argmin(fits.predict_chinchilla_law(LAW, np.exp(grid), np.exp(np.polyval(line, grid))))]
    return float(np.polyval(line, best) - best)


def test_analysis_finds_the_law_optimum_by_both_approaches(isoflop_sweep):
    analysis = analyze(isoflop_sweep, params="total", n_bootstrap=200)
    two, three = analysis.allocation["approach2"], analysis.allocation["approach3"]
    assert [row["runs"] for row in two["budgets"]] == [5] * len(cpu_isoflop.BUDGETS)
    # Approach 2: its intervals hold what it finds without noise, which is the law's minimum along each
    # budget's FLOP constraint up to the parabola's approximation of the law (largest where the minimum
    # lies near the end of a budget's sizes).
    budgets = isoflop_budgets(analysis.usable, "cerebras")
    exact = fits.fit_isoflop_minima([(np.array([r.flops["cerebras"] for r in b]), np.array([r.n_params for r in b]),
                                      np.array([r.tokens for r in b]),
                                      fits.predict_chinchilla_law(LAW, np.array([r.n_params for r in b]),
                                                                  np.array([r.tokens for r in b]))) for b in budgets],
                                    n_bootstrap=0)
    found = exact.log_d_opt - exact.log_n_opt
    np.testing.assert_allclose(found, [_law_minimum_along(b) for b in budgets], atol=math.log(1.25))
    lo, hi = two["tokens_per_param_ci95"]  # per budget, coverage is tested in test_scaling_fits.py
    assert lo < math.exp(np.mean(found)) < hi
    # Approach 3 against the law's optimum under its own C = kappa·N·D.
    n_opt, d_opt = fits.chinchilla_optimum(LAW, np.array([row["compute"] for row in two["budgets"]]), three["kappa"])
    lo, hi = three["tokens_per_param_ci95"]
    assert lo < math.exp(np.mean(np.log(d_opt / n_opt))) < hi
    a_true = LAW["beta"] / (LAW["alpha"] + LAW["beta"])
    assert three["n_exponent_ci95"][0] < a_true < three["n_exponent_ci95"][1]

    paths = write_outputs(analysis, isoflop_sweep)
    report = paths["report"].read_text()
    assert "## Compute-optimal allocation (Chinchilla approaches 2 and 3)" in report
    assert "the published rule: 20" in report
    fit = json.loads(paths["fit"].read_text())
    assert fit["compute_optimal"]["approach2"]["tokens_per_param"] == pytest.approx(two["tokens_per_param"])
    assert paths["isoflop_plot"].stat().st_size > 10_000


def test_budgets_are_grouped_by_compute(isoflop_sweep):
    analysis = analyze(isoflop_sweep, params="total", n_bootstrap=0)
    computes = [row["compute"] for row in analysis.allocation["approach2"]["budgets"]]
    np.testing.assert_allclose(computes, cpu_isoflop.BUDGETS, rtol=0.02)
