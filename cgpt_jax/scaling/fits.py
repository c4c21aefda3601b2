"""Scaling-law fits with uncertainty: L(C) = (C/a)^b + c and L(N, D) = E + A/N^alpha + B/D^beta.

Both laws are fitted as Besiroglu et al. (2024, "Chinchilla Scaling: A replication attempt") found
necessary to reproduce and stabilise Hoffmann et al.'s fit:
* in log-loss space, with the law written as a log-sum-exp of terms that are linear in the parameters
  (log L = LSE(k + b·x, e) for L(C)), which keeps the problem well scaled across decades of compute;
* a Huber loss on the log-loss residuals (delta = 1e-3), so one odd run cannot drag the curve;
* many starting points on a grid (the objective has local minima) and bounds that keep the constants
  physical (exponents of the right sign, irreducible loss no larger than the data).
Uncertainty comes from a residual bootstrap: the compute grid of a sweep is fixed by design, so
resampling runs would repeat points; we resample the fit's residuals instead (inflated by
sqrt(n / (n - p)) for the degrees of freedom the fit used) and refit, starting from the fitted optimum.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from scipy import stats

HUBER_DELTA = 1e-3
CI_LEVEL = 0.95
_BOOTSTRAP_EXTRA_STARTS = 2  # grid starts added to the warm start in each bootstrap refit
_AT_BOUND_TOL = 1e-6
_MAX_ITERATIONS = 300  # converged problems stop earlier; the few that creep are at their optimum by then


@dataclasses.dataclass(frozen=True)
class _Problem:
    """A law on a fixed set of inputs: log L_pred = logsumexp_m (J[:, m, :] @ theta)."""

    J: np.ndarray  # [n_points, n_terms, n_params]
    theta_names: tuple[str, ...]  # the reported constant each fit parameter determines
    bounds: list[tuple[float, float]]
    starts: np.ndarray  # [n_starts, n_params]
    constants: Callable[[np.ndarray], dict[str, float]]  # theta -> reported constants


@dataclasses.dataclass
class FitResult:
    law: str  # 'L(C)' | 'L(N,D)'
    formula: str
    constants: dict[str, float]
    ci: dict[str, tuple[float, float]] | None  # 95% bootstrap intervals; None without spare points
    samples: np.ndarray | None  # [n_bootstrap, n_constants], columns in `constants` order
    at_bound: list[str]  # fit parameters that ended on a bound (the constant is then not identified)
    n_points: int
    r2: float  # on the loss itself (not its log)
    rel_residual_std: float  # std of (L_pred - L) / L
    huber_delta: float

    def summary(self) -> dict:
        return {"law": self.law, "formula": self.formula, "constants": self.constants,
                "ci95": self.ci, "at_bound": self.at_bound, "n_points": self.n_points, "r2": self.r2,
                "rel_residual_std": self.rel_residual_std, "huber_delta": self.huber_delta,
                "n_bootstrap": 0 if self.samples is None else len(self.samples)}


def predict_compute_law(constants: dict[str, float], compute) -> np.ndarray:
    c = np.asarray(compute, dtype=float)
    return (c / constants["a"]) ** constants["b"] + constants["c"]


def predict_chinchilla_law(constants: dict[str, float], n_params, tokens) -> np.ndarray:
    n, d = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
    k = constants
    return k["E"] + k["A"] / n ** k["alpha"] + k["B"] / d ** k["beta"]


def chinchilla_optimum(constants: dict[str, float], compute, flops_per_param_token: float):
    """(N_opt, D_opt) minimising L(N, D) subject to C = kappa·N·D (Hoffmann et al., App. D)."""
    k = constants
    alpha, beta = k["alpha"], k["beta"]
    g = (alpha * k["A"] / (beta * k["B"])) ** (1 / (alpha + beta))
    nd = np.asarray(compute, dtype=float) / flops_per_param_token
    n_opt = g * nd ** (beta / (alpha + beta))
    return n_opt, nd / n_opt


def _evaluate(J: np.ndarray, Y: np.ndarray, theta: np.ndarray, delta: float):
    """For S problems at once: objective [S], log-residuals [S, n], d log_pred / d theta [S, n, p]."""
    terms = np.einsum("nmp,sp->snm", J, theta)
    top = terms.max(axis=2, keepdims=True)
    weights = np.exp(terms - top)
    norm = weights.sum(axis=2, keepdims=True)
    log_pred = (top + np.log(norm))[..., 0]
    grad_log_pred = np.einsum("snm,nmp->snp", weights / norm, J)
    r = log_pred - Y
    # Huber divided by delta: the same minimiser, with values and gradients of order one.
    abs_r = np.abs(r)
    value = np.where(abs_r <= delta, 0.5 * r * r / delta, abs_r - 0.5 * delta).sum(axis=1)
    return value, r, grad_log_pred


def _minimize(J: np.ndarray, Y: np.ndarray, theta0: np.ndarray, bounds: list[tuple[float, float]],
              delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the Huber objective for S problems at once (rows of Y, starts theta0 [S, p]).

    Levenberg-Marquardt on the Huber-reweighted residuals (IRLS), projected onto the bounds, steps
    accepted only when they lower the objective. Batched in numpy because these problems are tiny:
    scipy's L-BFGS-B reaches the same optima (tests/test_scaling_fits.py checks it) but spends ~50x
    longer per start in per-iteration overhead, which would make a 1000-sample bootstrap take minutes.
    """
    lo, hi = np.array(bounds).T
    theta = np.clip(theta0, lo, hi)
    n_problems, p = theta.shape
    value, r, grad = _evaluate(J, Y, theta, delta)
    damping = np.full(n_problems, 1e-3)
    done = np.zeros(n_problems, bool)
    eye = np.eye(p)
    for _ in range(_MAX_ITERATIONS):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        ra, ga = r[active], grad[active]
        w = np.where(np.abs(ra) <= delta, 1.0, delta / np.maximum(np.abs(ra), 1e-300))
        hess = np.einsum("sn,snp,snq->spq", w, ga, ga)
        g = np.einsum("sn,sn,snp->sp", w, ra, ga)
        diag = np.einsum("spp->sp", hess)[:, :, None] * eye + 1e-12 * eye
        step = -np.linalg.solve(hess + damping[active, None, None] * diag, g[..., None])[..., 0]
        candidate = np.clip(theta[active] + step, lo, hi)
        value_c, r_c, grad_c = _evaluate(J, Y[active], candidate, delta)
        better = value_c < value[active]
        accepted, rejected = active[better], active[~better]
        small = (value[accepted] - value_c[better] <= 1e-10 * value[accepted]) | (
            np.abs(candidate[better] - theta[accepted]).max(axis=1) < 1e-9)
        theta[accepted], value[accepted] = candidate[better], value_c[better]
        r[accepted], grad[accepted] = r_c[better], grad_c[better]
        damping[accepted] *= 0.3
        damping[rejected] *= 10.0
        done[accepted[small]] = True
        done[rejected[damping[rejected] > 1e10]] = True
    return theta, value


def _grid(*axes) -> np.ndarray:
    return np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T


def _compute_problem(compute: np.ndarray, loss: np.ndarray) -> _Problem:
    # theta = (k, b, e): log L = LSE(k + b·x, e), x = log C - x0; c = exp(e), log a = x0 - k / b.
    log_c = np.log(compute)
    x0 = float(log_c.mean())
    x = log_c - x0
    n = len(x)
    J = np.zeros((n, 2, 3))
    J[:, 0, 0], J[:, 0, 1], J[:, 1, 2] = 1.0, x, 1.0
    l_min, l_max, l_med = loss.min(), loss.max(), float(np.median(loss))
    bounds = [(math.log(1e-6), math.log(10 * l_max)), (-5.0, -1e-4), (math.log(1e-4), math.log(l_max))]
    starts = []
    for c_frac in (0.05, 0.3, 0.6, 0.85):
        c = c_frac * l_min
        for b in (-0.03, -0.1, -0.3, -1.0):
            for dk in (-0.5, 0.0, 0.5):
                starts.append((math.log(l_med - c) + dk, b, math.log(c)))

    def constants(theta: np.ndarray) -> dict[str, float]:
        k, b, e = (float(v) for v in theta)
        with np.errstate(over="ignore"):  # b at its bound near 0 sends a to infinity: the curve is flat
            return {"a": float(np.exp(x0 - k / b)), "b": b, "c": math.exp(e)}

    return _Problem(J=J, theta_names=("a", "b", "c"), bounds=bounds,
                    starts=np.clip(np.array(starts), *np.array(bounds).T), constants=constants)


def _chinchilla_problem(n_params: np.ndarray, tokens: np.ndarray, loss: np.ndarray) -> _Problem:
    # theta = (a, alpha, b, beta, e): log L = LSE(a - alpha·(log N - n0), b - beta·(log D - d0), e).
    log_n, log_d = np.log(n_params), np.log(tokens)
    n0, d0 = float(log_n.mean()), float(log_d.mean())
    J = np.zeros((len(loss), 3, 5))
    J[:, 0, 0], J[:, 0, 1] = 1.0, -(log_n - n0)
    J[:, 1, 2], J[:, 1, 3] = 1.0, -(log_d - d0)
    J[:, 2, 4] = 1.0
    l_min, l_max, l_med = loss.min(), loss.max(), float(np.median(loss))
    term_bounds = (math.log(1e-6), math.log(10 * l_max))
    exp_bounds = (1e-3, 3.0)
    bounds = [term_bounds, exp_bounds, term_bounds, exp_bounds, (math.log(1e-4), math.log(l_max))]
    starts = []
    for e_frac, share, alpha, beta in _grid((0.1, 0.5, 0.85), (0.25, 0.5, 0.75), (0.1, 0.3, 0.6, 1.0),
                                            (0.1, 0.3, 0.6, 1.0)):
        rest = l_med - e_frac * l_min
        starts.append((math.log(share * rest), alpha, math.log((1 - share) * rest), beta,
                       math.log(e_frac * l_min)))

    def constants(theta: np.ndarray) -> dict[str, float]:
        a, alpha, b, beta, e = (float(v) for v in theta)
        return {"E": math.exp(e), "A": math.exp(a + alpha * n0), "alpha": alpha,
                "B": math.exp(b + beta * d0), "beta": beta}

    return _Problem(J=J, theta_names=("A", "alpha", "B", "beta", "E"), bounds=bounds,
                    starts=np.clip(np.array(starts), *np.array(bounds).T), constants=constants)


def _check_points(law: str, n_params: int, columns: dict[str, np.ndarray]) -> None:
    n = len(next(iter(columns.values())))
    for name, values in columns.items():
        if values.ndim != 1 or len(values) != n:
            raise ValueError(f"{law}: every input must be a 1-D array of the same length")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            bad = [float(v) for v in values if not (np.isfinite(v) and v > 0)]
            raise ValueError(f"{law}: {name} must be finite and positive; got {bad}. "
                             f"Exclude non-finite runs before fitting")
    if n < n_params:
        raise ValueError(f"{law} has {n_params} parameters but only {n} points were given; a fit needs at "
                         f"least {n_params} finished runs (and {n_params + 1} for confidence intervals)")


def _bootstrap_residuals(resid: np.ndarray, jac_NxP: np.ndarray) -> np.ndarray:
    """The residuals a bootstrap resamples, scaled to the noise they estimate.

    A fit pulls its curve toward each point by the point's leverage h_i (most at the ends of the range),
    so r_i / sqrt(1 - h_i) (Davison & Hinkley 1997, sec. 6.2.3; leverage from the model's Jacobian at
    the optimum). The noise scale is itself estimated from n - p residuals, so they are widened by
    Student's t over the normal quantile: without it the 95% intervals covered the truth in only 85-90%
    of draws with 5 spare points (tests/test_scaling_fits.py).
    """
    n, p = jac_NxP.shape
    leverage = np.einsum("np,pq,nq->n", jac_NxP, np.linalg.pinv(jac_NxP.T @ jac_NxP), jac_NxP)
    resid = resid / np.sqrt(np.clip(1 - leverage, 1e-3, None))
    widen = stats.t.ppf((1 + CI_LEVEL) / 2, n - p) / stats.norm.ppf((1 + CI_LEVEL) / 2)
    return (resid - resid.mean()) * widen


def _fit(law: str, formula: str, problem: _Problem, loss: np.ndarray, n_bootstrap: int, seed: int,
         delta: float) -> FitResult:
    y = np.log(loss)
    n, p = problem.J.shape[0], problem.J.shape[2]
    thetas, values = _minimize(problem.J, np.tile(y, (len(problem.starts), 1)), problem.starts, problem.bounds,
                               delta)
    theta = thetas[np.argmin(values)]
    _, r_fit, grad = _evaluate(problem.J, y[None], theta[None], delta)
    log_pred = y + r_fit[0]
    constants = problem.constants(theta)

    pred = np.exp(log_pred)
    r2 = float(1 - np.sum((loss - pred) ** 2) / np.sum((loss - loss.mean()) ** 2))
    rel = (pred - loss) / loss
    at_bound = [name for name, v, (lo, hi) in zip(problem.theta_names, theta, problem.bounds)
                if min(v - lo, hi - v) <= _AT_BOUND_TOL * (hi - lo)]

    ci, samples = None, None
    if n > p and n_bootstrap > 0:  # with n == p the fit interpolates and leaves no residuals to resample
        rng = np.random.default_rng(seed)
        resid = _bootstrap_residuals(y - log_pred, grad[0])
        y_boot = log_pred + rng.choice(resid, size=(n_bootstrap, n), replace=True)
        # Each resample starts from the fitted optimum and from a few grid points.
        n_starts = 1 + _BOOTSTRAP_EXTRA_STARTS
        starts = problem.starts[rng.integers(len(problem.starts), size=(n_bootstrap, n_starts))]
        starts[:, 0] = theta
        thetas_b, values_b = _minimize(problem.J, np.repeat(y_boot, n_starts, axis=0), starts.reshape(-1, p),
                                       problem.bounds, delta)
        best = np.argmin(values_b.reshape(n_bootstrap, n_starts), axis=1)
        thetas_b = thetas_b.reshape(n_bootstrap, n_starts, p)[np.arange(n_bootstrap), best]
        samples = np.array([list(problem.constants(t).values()) for t in thetas_b])
        lo, hi = np.quantile(samples, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2], axis=0)
        ci = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(constants)}
    return FitResult(law=law, formula=formula, constants=constants, ci=ci, samples=samples, at_bound=at_bound,
                     n_points=n, r2=r2, rel_residual_std=float(rel.std()), huber_delta=delta)


def fit_compute_law(compute, loss, *, n_bootstrap: int = 1000, seed: int = 0,
                    delta: float = HUBER_DELTA) -> FitResult:
    """Fit L(C) = (C/a)^b + c (the form of Cerebras-GPT's Eq. 1) to final losses against compute."""
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    _check_points("L(C)", 3, {"compute": compute, "loss": loss})
    return _fit("L(C)", "L(C) = (C/a)^b + c", _compute_problem(compute, loss), loss, n_bootstrap, seed, delta)


def fit_chinchilla_law(n_params, tokens, loss, *, n_bootstrap: int = 1000, seed: int = 0,
                       delta: float = HUBER_DELTA) -> FitResult:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3)."""
    n_params, tokens = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
    loss = np.asarray(loss, dtype=float)
    _check_points("L(N,D)", 5, {"n_params": n_params, "tokens": tokens, "loss": loss})
    return _fit("L(N,D)", "L(N,D) = E + A/N^alpha + B/D^beta",
                _chinchilla_problem(n_params, tokens, loss), loss, n_bootstrap, seed, delta)



@dataclasses.dataclass
class IsoflopFit:
    """Chinchilla's approach 2: a parabola of loss in log N per compute budget; its vertex is N_opt(C)."""

    compute: np.ndarray  # [K] each budget's compute (the mean over its runs)
    log_n_opt: np.ndarray  # [K] vertex of each budget's parabola (NaN: it opens downward)
    log_d_opt: np.ndarray  # [K] tokens at the vertex, along the budget's own log D(log N) line
    loss_opt: np.ndarray  # [K] the parabola's value at its vertex
    inside: np.ndarray  # [K] bool: the vertex lies within the budget's sampled sizes
    n_points: np.ndarray  # [K] runs per budget
    log_n_draws: np.ndarray | None  # [n_bootstrap, K] bootstrap draws of log N_opt (NaN: no minimum, or a
    # budget of 3 runs, which has no residuals to resample)
    log_d_draws: np.ndarray | None  # [n_bootstrap, K]

    def n_exponent(self, log_n: np.ndarray | None = None) -> float:
        """a in N_opt ∝ C^a: least squares in log over the budgets with a minimum (D_opt ∝ C^(1-a))."""
        log_n = self.log_n_opt if log_n is None else log_n
        ok = np.isfinite(log_n)
        return float(np.polyfit(np.log(self.compute[ok]), log_n[ok], 1)[0]) if ok.sum() >= 2 else math.nan

    def summary(self) -> dict:
        """Per budget N_opt, D_opt, D_opt/N_opt with 95% intervals; the exponent a; D/N over all budgets
        (geometric mean: the compute-optimal tokens per parameter in the middle of the budgets)."""
        ratio = np.exp(self.log_d_opt - self.log_n_opt)
        out: dict = {"budgets": [], "n_exponent": self.n_exponent(),
                     "tokens_per_param": float(np.exp(np.nanmean(self.log_d_opt - self.log_n_opt)))}
        draws = self.log_n_draws is not None
        if draws:
            log_ratio = self.log_d_draws - self.log_n_draws
            out["n_exponent_ci95"] = interval([self.n_exponent(row) for row in self.log_n_draws])
            out["tokens_per_param_ci95"] = interval(np.exp(np.mean(log_ratio, axis=1)))
            resampled = self.n_points > 3
            out["no_minimum_fraction"] = float(np.mean(~np.isfinite(self.log_n_draws[:, resampled])))
        for k, c in enumerate(self.compute):
            row = {"compute": float(c), "runs": int(self.n_points[k]), "n_opt": float(np.exp(self.log_n_opt[k])),
                   "tokens_opt": float(np.exp(self.log_d_opt[k])), "tokens_per_param": float(ratio[k]),
                   "loss_opt": float(self.loss_opt[k]), "inside": bool(self.inside[k])}
            if draws:
                row["n_opt_ci95"] = interval(np.exp(self.log_n_draws[:, k]))
                row["tokens_per_param_ci95"] = interval(np.exp(log_ratio[:, k]))
            out["budgets"].append(row)
        return out


def interval(values) -> list[float] | None:
    """95% percentile interval of the finite values (None when there are none)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return [float(v) for v in np.quantile(values, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])] if values.size else None


def _vertex(log_n: np.ndarray, loss_SxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertex (x, y) of the least-squares parabola through each row of loss_SxN; NaN where it opens down."""
    c2, c1, c0 = np.polyfit(log_n, loss_SxN.T, 2)
    convex = c2 > 0
    x = np.where(convex, -c1 / (2 * np.where(convex, c2, 1.0)), np.nan)
    return x, c0 + c1 * x + c2 * x * x


def fit_isoflop_minima(budgets: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], *,
                       n_bootstrap: int = 1000, seed: int = 0) -> IsoflopFit:
    """Approach 2 of Hoffmann et al. (2022) on budgets given as (compute, N, D, loss) arrays of their runs.

    Each budget's parabola in log N gives N_opt; D_opt follows the budget's own line log D(log N) (at a
    fixed budget D ∝ 1/N up to the FLOP count's attention and head terms). Uncertainty: a residual
    bootstrap of each parabola, as for the laws; a budget of 3 runs has no spare points and no interval.
    """
    if len(budgets) < 2:
        raise ValueError(f"approach 2 needs at least 2 compute budgets of 3 or more runs; got {len(budgets)}")
    rng = np.random.default_rng(seed)
    compute, x_opt, y_opt, d_opt, inside, sizes, x_draws, d_draws = [], [], [], [], [], [], [], []
    for c, n, d, loss in budgets:
        loss = np.asarray(loss, dtype=float)
        if len(loss) < 3:
            raise ValueError(f"the budget at C = {np.mean(c):.3g} has {len(loss)} runs; a parabola needs 3")
        log_n = np.log(n)
        x, y = _vertex(log_n, loss[None])
        line = np.polyfit(log_n, np.log(d), 1)
        compute.append(float(np.mean(c)))
        x_opt.append(x[0])
        y_opt.append(y[0])
        d_opt.append(np.polyval(line, x[0]))
        inside.append(bool(log_n.min() <= x[0] <= log_n.max()))
        sizes.append(len(loss))
        xb = np.full(n_bootstrap, np.nan)  # a budget of 3 runs: its parabola interpolates, nothing to resample
        if len(loss) > 3:
            fitted = np.polyval(np.polyfit(log_n, loss, 2), log_n)
            resid = _bootstrap_residuals(loss - fitted, np.vander(log_n, 3))
            xb = _vertex(log_n, fitted + rng.choice(resid, size=(n_bootstrap, len(loss))))[0]
        x_draws.append(xb)
        d_draws.append(np.polyval(line, xb))
    with_draws = n_bootstrap > 0 and max(sizes) > 3
    return IsoflopFit(compute=np.array(compute), log_n_opt=np.array(x_opt), log_d_opt=np.array(d_opt),
                      loss_opt=np.array(y_opt), inside=np.array(inside), n_points=np.array(sizes),
                      log_n_draws=np.array(x_draws).T if with_draws else None,
                      log_d_draws=np.array(d_draws).T if with_draws else None)
