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
    """1% log-normal noise on 8 runs: the true constants fall inside the 95% intervals in most trials."""
    rng = np.random.default_rng(1234)
    truth = {"a": 1e16, "b": -0.3, "c": 1.5}
    compute = np.logspace(12, 16, 8)
    trials = 20
    covered = {k: 0 for k in truth}
    for trial in range(trials):
        loss = fits.predict_compute_law(truth, compute) * np.exp(rng.normal(0, 0.01, compute.size))
        fit = fits.fit_compute_law(compute, loss, n_bootstrap=100, seed=trial)
        for k, inside in _inside(fit, truth).items():
            covered[k] += inside
    assert all(c >= 0.75 * trials for c in covered.values()), covered


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
