"""The scaling-law fitter: published Cerebras-GPT points, synthetic laws with noise, bad inputs."""
import json

import numpy as np
import pytest
from scipy import optimize

from cgpt_jax.scaling import fits
from cgpt_jax.scaling.reference import load_cerebras

EQ1 = {"a": 5.984e22, "b": -0.0737, "c": 0.5066}  # Dey et al. 2023, Eq. 1


@pytest.fixture(scope="module")
def cerebras():
    return load_cerebras()  # the published values shipped with the package


def _inside(fit: fits.FitResult, truth: dict[str, float]) -> dict[str, bool]:
    return {k: fit.ci[k][0] <= v <= fit.ci[k][1] for k, v in truth.items()}


def test_reference_matches_eq1(cerebras):
    assert cerebras.law == EQ1
    assert cerebras.names == ["111M", "256M", "590M", "1.3B", "2.7B", "6.7B", "13B"]
    assert cerebras.flops[0] == 2.6e18 and cerebras.loss[-1] == 1.572


def test_recovers_cerebras_eq1_within_its_intervals(cerebras):
    fit = fits.fit_compute_law(cerebras.flops, cerebras.loss, n_bootstrap=300, seed=0)
    assert _inside(fit, EQ1) == {"a": True, "b": True, "c": True}, (fit.constants, fit.ci)
    assert fit.r2 > 0.99 and fit.rel_residual_std < 0.01
    # Eq. 1 and our fit describe the published points equally well (within 1% everywhere).
    ours = fits.predict_compute_law(fit.constants, cerebras.flops)
    assert np.max(np.abs(ours / fits.predict_compute_law(EQ1, cerebras.flops) - 1)) < 0.01


def test_solver_matches_scipy_lbfgsb(cerebras):
    """The batched solver finds the optimum scipy's L-BFGS-B finds from the same starts."""
    problem = fits._compute_problem(np.array(cerebras.flops), np.array(cerebras.loss))
    y = np.log(cerebras.loss)
    ours = fits._minimize(problem.J, np.tile(y, (len(problem.starts), 1)), problem.starts, problem.bounds,
                          fits.HUBER_DELTA)[1].min()

    def objective(theta):
        value, r, grad = fits._evaluate(problem.J, y[None], theta[None], fits.HUBER_DELTA)
        dr = np.clip(r / fits.HUBER_DELTA, -1, 1)
        return value[0], np.einsum("n,np->p", dr[0], grad[0])

    scipy_best = min(optimize.minimize(objective, s, jac=True, method="L-BFGS-B", bounds=problem.bounds).fun
                     for s in problem.starts[::6])
    assert ours <= scipy_best * (1 + 1e-6)


def test_noise_free_points_are_recovered_exactly():
    truth = {"a": 1e16, "b": -0.3, "c": 1.5}
    compute = np.logspace(12, 16, 6)
    fit = fits.fit_compute_law(compute, fits.predict_compute_law(truth, compute), n_bootstrap=0)
    for k, v in truth.items():
        assert fit.constants[k] == pytest.approx(v, rel=1e-3)
    assert fit.ci is None and fit.r2 == pytest.approx(1.0)


def test_synthetic_compute_law_coverage():
    """1% log-normal noise on 8 runs: the 95% intervals cover each true constant in at least 90 of 100 draws
    (without the Student-t widening of the residuals they covered 85-90)."""
    rng = np.random.default_rng(1234)
    truth = {"a": 1e16, "b": -0.3, "c": 1.5}
    compute = np.logspace(12, 16, 8)
    covered = {k: 0 for k in truth}
    for draw in range(100):
        loss = fits.predict_compute_law(truth, compute) * np.exp(rng.normal(0, 0.01, compute.size))
        fit = fits.fit_compute_law(compute, loss, n_bootstrap=100, seed=draw)
        for k, inside in _inside(fit, truth).items():
            covered[k] += inside
    assert all(c >= 90 for c in covered.values()), covered


def test_synthetic_chinchilla_law_coverage():
    """Hoffmann et al.'s constants on an isoFLOP grid (4 budgets x 5 sizes), 0.5% noise."""
    rng = np.random.default_rng(7)
    truth = {"E": 1.82, "A": 482.0, "alpha": 0.35, "B": 2085.0, "beta": 0.37}
    n, d = [], []
    for budget in np.logspace(17, 20, 4):
        for size in np.logspace(-0.8, 0.8, 5) * np.sqrt(budget / 6):
            n.append(size)
            d.append(budget / 6 / size)
    n, d = np.array(n), np.array(d)
    trials = 8
    covered = {k: 0 for k in truth}
    for trial in range(trials):
        loss = fits.predict_chinchilla_law(truth, n, d) * np.exp(rng.normal(0, 0.005, n.size))
        fit = fits.fit_chinchilla_law(n, d, loss, n_bootstrap=100, seed=trial)
        for k, inside in _inside(fit, truth).items():
            covered[k] += inside
    assert all(c >= 0.75 * trials for c in covered.values()), covered


def test_chinchilla_optimum_is_the_minimum_at_fixed_compute():
    k = {"E": 1.82, "A": 482.0, "alpha": 0.35, "B": 2085.0, "beta": 0.37}
    budget = 1e21
    n_opt, d_opt = fits.chinchilla_optimum(k, budget, 6.0)
    assert 6 * n_opt * d_opt == pytest.approx(budget)
    best = fits.predict_chinchilla_law(k, n_opt, d_opt)
    for factor in (0.8, 1.25):
        assert fits.predict_chinchilla_law(k, n_opt * factor, d_opt / factor) > best


def test_too_few_points_and_bad_values():
    with pytest.raises(ValueError, match="3 parameters but only 2 points"):
        fits.fit_compute_law([1e12, 1e13], [3.0, 2.5])
    with pytest.raises(ValueError, match="5 parameters but only 4 points"):
        fits.fit_chinchilla_law([1, 2, 3, 4], [1, 2, 3, 4], [3, 2.9, 2.8, 2.7])
    with pytest.raises(ValueError, match="finite and positive"):
        fits.fit_compute_law([1e12, 1e13, 1e14, 1e15], [3.0, float("nan"), 2.5, 2.4])
    with pytest.raises(ValueError, match="same length"):
        fits.fit_compute_law([1e12, 1e13, 1e14], [3.0, 2.5])
    # As many points as constants: a fit, but no intervals (no residuals left to resample).
    fit = fits.fit_compute_law([1e12, 1e13, 1e14], [3.0, 2.6, 2.4], n_bootstrap=50)
    assert fit.ci is None and fit.samples is None


def test_summary_is_strict_json_with_the_fit():
    fit = fits.fit_compute_law(np.logspace(12, 15, 5), [3.0, 2.7, 2.5, 2.35, 2.25], n_bootstrap=20)
    summary = json.loads(json.dumps(fit.summary(), allow_nan=False))  # fit.json must hold no NaN/Infinity
    assert summary["formula"] == fit.formula and summary["n_points"] == 5 and summary["n_bootstrap"] == 20
    assert summary["constants"] == fit.constants and set(summary["constants"]) == {"a", "b", "c"}
    assert summary["ci95"] == {k: list(v) for k, v in fit.ci.items()}
    assert all(lo <= hi for lo, hi in summary["ci95"].values())
    assert 0.9 < summary["r2"] <= 1.0


def _isoflop_grid(law: dict[str, float], budgets, sizes_per_budget: int = 5, noise: float = 0.0, seed: int = 0):
    """(compute, N, D, loss) per budget, sizes spread over a factor 4 each side of 20 tokens/parameter."""
    rng = np.random.default_rng(seed)
    out = []
    for budget in budgets:
        n = np.logspace(-0.6, 0.6, sizes_per_budget) * np.sqrt(budget / 6 / 20)
        d = budget / 6 / n
        loss = fits.predict_chinchilla_law(law, n, d) * np.exp(rng.normal(0, noise, n.size))
        out.append((np.full(n.size, budget), n, d, loss))
    return out


def test_isoflop_vertices_of_exact_parabolas():
    """Losses that are exact parabolas in log N: every vertex, the exponent and D_opt/N_opt are exact."""
    budgets, truth_log_n = [], []
    for k, budget in enumerate([1e12, 1e13, 1e14]):
        log_n_opt = 0.4 * np.log(budget) - 2.0
        n = np.exp(log_n_opt + np.linspace(-1.5, 0.5, 5))  # the vertex off centre
        budgets.append((np.full(5, budget), n, budget / (6 * n), 3.0 - k * 0.2 + 0.05 * (np.log(n) - log_n_opt) ** 2))
        truth_log_n.append(log_n_opt)
    fit = fits.fit_isoflop_minima(budgets, n_bootstrap=0)
    np.testing.assert_allclose(fit.log_n_opt, truth_log_n, rtol=1e-9)
    np.testing.assert_allclose(fit.loss_opt, [3.0, 2.8, 2.6], rtol=1e-9)
    assert fit.n_exponent() == pytest.approx(0.4) and fit.inside.all()
    summary = fit.summary()
    for row, log_n in zip(summary["budgets"], truth_log_n):
        assert row["tokens_per_param"] == pytest.approx(row["compute"] / 6 / np.exp(2 * log_n), rel=1e-9)


def test_isoflop_minima_find_the_chinchilla_optimum():
    """On Hoffmann et al.'s law, approach 2 lands within 2% of the law's exact optimum (a parabola only
    approximates the law around it); with 0.5% noise its 95% intervals on D_opt/N_opt hold the noise-free
    result in at least 90% of 50 draws x 4 budgets."""
    truth = {"E": 1.82, "A": 482.0, "alpha": 0.35, "B": 2085.0, "beta": 0.37}
    budgets = np.logspace(17, 20, 4)
    n_opt, _ = fits.chinchilla_optimum(truth, budgets, 6.0)
    exact = fits.fit_isoflop_minima(_isoflop_grid(truth, budgets), n_bootstrap=0)
    np.testing.assert_allclose(np.exp(exact.log_n_opt), n_opt, rtol=0.02)
    assert exact.n_exponent() == pytest.approx(truth["beta"] / (truth["alpha"] + truth["beta"]), abs=0.01)
    target = np.exp(exact.log_d_opt - exact.log_n_opt)
    covered = 0
    for draw in range(50):
        noisy = fits.fit_isoflop_minima(_isoflop_grid(truth, budgets, noise=0.005, seed=draw), n_bootstrap=200,
                                        seed=draw)
        covered += sum(lo < ratio < hi for (lo, hi), ratio in
                       zip((row["tokens_per_param_ci95"] for row in noisy.summary()["budgets"]), target))
    assert covered >= 0.9 * 200, covered


def test_isoflop_budget_without_a_minimum():
    """A budget whose parabola opens downward has no vertex: NaN, and the exponent uses the others."""
    budgets = _isoflop_grid({"E": 1.82, "A": 482.0, "alpha": 0.35, "B": 2085.0, "beta": 0.37}, [1e17, 1e18, 1e19])
    c, n, d, _ = budgets[1]
    log_n = np.log(n) - np.log(n).mean()
    budgets[1] = (c, n, d, 3.0 - 0.1 * log_n - 0.02 * log_n ** 2)  # bends downward: no minimum
    fit = fits.fit_isoflop_minima(budgets, n_bootstrap=0)
    assert np.isnan(fit.log_n_opt[1]) and np.isfinite(fit.log_n_opt[[0, 2]]).all()
    assert np.isfinite(fit.n_exponent())
    with pytest.raises(ValueError, match="a parabola needs 3"):
        fits.fit_isoflop_minima([(c[:2], n[:2], d[:2], n[:2])] * 2)
    with pytest.raises(ValueError, match="at least 2 compute budgets"):
        fits.fit_isoflop_minima(budgets[:1])
