"""The three laws fitted to a sweep, each with percentile bootstrap intervals.

Loss vs compute L = E + A·C^-alpha and downstream vs compute f = a ∓ b·C^-beta are fitted by
Huber regression (on log L, on f) with L-BFGS-B from a grid of starts; downstream vs loss
f = intercept + slope·L by least squares. Everything here is numpy/scipy and pure.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from glp_jax.errors import GLPError
from glp_jax.scaling.formatting import format_number

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A·C^-alpha, fitted by robust regression on log L; bootstrap intervals."""

    E: float
    A: float
    alpha: float
    compute: np.ndarray  # the points the fit used
    loss: np.ndarray
    intervals: dict[str, tuple[float, float]]  # empty when n_boot == 0
    confidence: float
    n_boot: int
    huber_delta: float
    objective: float

    law = "L = E + A*C^-alpha"

    @property
    def coefficients(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(compute, dtype=np.float64) ** -self.alpha

    def formula(self, y: str = "L", x: str = "C") -> str:
        return f"{y} = {format_number(self.E)} + {format_number(self.A)}·{x}^-{format_number(self.alpha)}"

    def to_dict(self) -> dict:
        return _fit_dict(self, x=self.compute, y=self.loss, names=("compute", "loss"))

    @classmethod
    def from_dict(cls, d: Mapping) -> PowerLawFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("E", "A", "alpha"), ("compute", "loss")),
                   huber_delta=float(d["huber_delta"]), objective=_number(d.get("objective")))


@dataclass(frozen=True)
class SaturatingFit:
    """f(C) = a - b·C^-beta (increasing metrics) or a + b·C^-beta (decreasing ones)."""

    a: float
    b: float
    beta: float
    increasing: bool
    compute: np.ndarray
    value: np.ndarray
    intervals: dict[str, tuple[float, float]]
    confidence: float
    n_boot: int
    huber_delta: float
    objective: float

    @property
    def law(self) -> str:
        return f"f = a {'-' if self.increasing else '+'} b*C^-beta"

    @property
    def coefficients(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "beta": self.beta}

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        sign = -1.0 if self.increasing else 1.0
        return self.a + sign * self.b * np.asarray(compute, dtype=np.float64) ** -self.beta

    def formula(self, y: str = "f", x: str = "C") -> str:
        sign = -1.0 if self.increasing else 1.0
        term = f"{format_number(abs(self.b))}·{x}^-{format_number(self.beta)}"
        return f"{y} = {format_number(self.a)} {'-' if sign * self.b < 0 else '+'} {term}"

    def to_dict(self) -> dict:
        return {**_fit_dict(self, x=self.compute, y=self.value, names=("compute", "value")),
                "increasing": self.increasing}

    @classmethod
    def from_dict(cls, d: Mapping) -> SaturatingFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("a", "b", "beta"), ("compute", "value")),
                   increasing=bool(d["increasing"]), huber_delta=float(d["huber_delta"]),
                   objective=_number(d.get("objective")))


@dataclass(frozen=True)
class LinearFit:
    """f = intercept + slope·L by least squares; bootstrap intervals."""

    intercept: float
    slope: float
    loss: np.ndarray
    value: np.ndarray
    intervals: dict[str, tuple[float, float]]
    confidence: float
    n_boot: int

    law = "f = intercept + slope*L"

    @property
    def coefficients(self) -> dict[str, float]:
        return {"intercept": self.intercept, "slope": self.slope}

    def predict(self, loss: np.ndarray | float) -> np.ndarray:
        return self.intercept + self.slope * np.asarray(loss, dtype=np.float64)

    def formula(self, y: str = "f", x: str = "L") -> str:
        sign = "-" if self.slope < 0 else "+"
        return f"{y} = {format_number(self.intercept)} {sign} {format_number(abs(self.slope))}·{x}"

    def to_dict(self) -> dict:
        return _fit_dict(self, x=self.loss, y=self.value, names=("loss", "value"))

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("intercept", "slope"), ("loss", "value")))


def _fit_dict(fit, *, x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> dict:
    """Coefficients, intervals and the fitted points (x, y; what they are in x_name/y_name)."""
    out = {"law": fit.law, "formula": fit.formula(), **fit.coefficients,
           "intervals": {k: list(v) for k, v in fit.intervals.items()},
           "confidence": fit.confidence, "n_boot": fit.n_boot, "n_points": len(x),
           "x_name": names[0], "y_name": names[1], "x": x.tolist(), "y": y.tolist()}
    if hasattr(fit, "huber_delta"):
        out["huber_delta"] = fit.huber_delta
    return out


def _fit_fields(d: Mapping, coefficients: Sequence[str],
                points: tuple[str, str]) -> dict:
    """The fields every fit class shares, read back from `_fit_dict` output.

    `objective` is not written there; JSON turns NaN into null, so null reads back as NaN.
    """
    return {**{name: _number(d[name]) for name in coefficients},
            points[0]: np.asarray(d["x"], dtype=np.float64),
            points[1]: np.asarray(d["y"], dtype=np.float64),
            "intervals": {k: (_number(lo), _number(hi))
                          for k, (lo, hi) in d.get("intervals", {}).items()},
            "confidence": float(d["confidence"]), "n_boot": int(d["n_boot"])}


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _one_blas_thread(fn: Callable) -> Callable:
    """Run `fn` with single-threaded BLAS.

    L-BFGS-B on three parameters makes thousands of BLAS calls on tiny vectors; with a
    multi-threaded OpenBLAS on a busy host each one pays a thread hand-off (measured on
    2 loaded cores: a bootstrap ran 25x slower).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        limit = (threadpool_limits(1, user_api="blas") if threadpool_limits is not None
                 else contextlib.nullcontext())
        with limit:
            return fn(*args, **kwargs)

    return wrapper


@_one_blas_thread
def fit_power_law(compute: Sequence[float], loss: Sequence[float], *, huber_delta: float = 1e-3,
                  n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> PowerLawFit:
    """Fit L = E + A·C^-alpha as log L = logaddexp(log A - alpha log C, log E).

    Huber loss on the log residuals, L-BFGS-B from a grid of starts, best optimum kept;
    `n_boot` bootstrap refits give percentile intervals (0 skips them).
    """
    x, y = _check_xy(compute, loss, "compute", "loss", min_points=4, positive_y=True)
    theta, objective = _fit_loss_law(x, y, huber_delta)
    intervals = {}
    if n_boot:
        intervals = _percentile_intervals(
            _bootstrap(lambda xs, ys, starts: _fit_loss_law(xs, ys, huber_delta, starts)[0],
                       x, y, theta, _loss_law_starts(x, y), n_boot, seed),
            _loss_law_coefficients, ("E", "A", "alpha"), confidence)
    E, A, alpha = _loss_law_coefficients(theta, x)
    return PowerLawFit(E, A, alpha, x, y, intervals, confidence, n_boot, huber_delta, objective)


def bootstrap_fit(compute: Sequence[float], loss: Sequence[float], n_boot: int = 1000,
                  seed: int = 0, *, huber_delta: float = 1e-3,
                  confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals for E, A, alpha from refits on points resampled with replacement."""
    if n_boot < 1:
        raise GLPError(f"n_boot={n_boot}; the bootstrap needs at least one resample (use ~1000)")
    fit = fit_power_law(compute, loss, huber_delta=huber_delta, n_boot=n_boot, seed=seed,
                        confidence=confidence)
    return fit.intervals


@_one_blas_thread
def fit_downstream_vs_compute(compute: Sequence[float], value: Sequence[float], *,
                              increasing: bool | None = None, huber_delta: float = 1e-3,
                              n_boot: int = 1000, seed: int = 0,
                              confidence: float = 0.95) -> SaturatingFit:
    """Fit f(C) = a - b·C^-beta (or a + b·C^-beta for metrics that fall with compute).

    Same robust machinery as the loss law, with residuals in the metric's own units (a
    metric such as AUC can be near 0 or 1, so no logs). `increasing=None` reads the
    direction from the sign of the correlation between f and log C.
    """
    x, y = _check_xy(compute, value, "compute", "value", min_points=4)
    if increasing is None:
        increasing = bool(np.corrcoef(np.log(x), y)[0, 1] >= 0) if np.ptp(y) > 0 else True
    sign = -1.0 if increasing else 1.0
    theta, objective = _fit_saturating(x, y, sign, huber_delta)
    intervals = {}
    if n_boot:
        intervals = _percentile_intervals(
            _bootstrap(lambda xs, ys, starts: _fit_saturating(xs, ys, sign, huber_delta, starts)[0],
                       x, y, theta, _saturating_starts(x, y, sign), n_boot, seed),
            _saturating_coefficients, ("a", "b", "beta"), confidence)
    a, b, beta = _saturating_coefficients(theta, x)
    return SaturatingFit(a, b, beta, increasing, x, y, intervals, confidence, n_boot,
                         huber_delta, objective)


@_one_blas_thread
def fit_linear_vs_loss(loss: Sequence[float], value: Sequence[float], *, n_boot: int = 1000,
                       seed: int = 0, confidence: float = 0.95) -> LinearFit:
    """Fit f = intercept + slope·L by least squares (the paper's downstream-vs-loss lines)."""
    x, y = _check_xy(loss, value, "loss", "value", min_points=3, positive_x=False)
    intercept, slope = _linear(x, y)
    intervals = {}
    if n_boot:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(x), len(x))
            if np.ptp(x[idx]) > 0:
                samples.append(_linear(x[idx], y[idx]))
        intervals = _intervals_from_samples(np.array(samples), ("intercept", "slope"), confidence)
    return LinearFit(intercept, slope, x, y, intervals, confidence, n_boot)


def _linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def _check_xy(x, y, x_name: str, y_name: str, *, min_points: int, positive_x: bool = True,
              positive_y: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise GLPError(f"{x_name} and {y_name} differ in length ({len(x)} vs {len(y)}); "
                       "pass one value per point")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise GLPError(f"{x_name}/{y_name} contain NaN or Inf; drop those points before fitting")
    if positive_x and (x <= 0).any():
        raise GLPError(f"{x_name} must be > 0 (the law uses log {x_name}); drop the "
                       f"{int((x <= 0).sum())} point(s) at or below 0")
    if positive_y and (y <= 0).any():
        raise GLPError(f"{y_name} must be > 0 to fit in log space; drop the "
                       f"{int((y <= 0).sum())} point(s) at or below 0")
    n_distinct = len(np.unique(x))
    if n_distinct < min_points:
        raise GLPError(f"too few points to fit: {n_distinct} distinct {x_name} value(s), need "
                       f">= {min_points}; log more checkpoints, add runs, or lower min_activations")
    return x, y


def _huber_objective(model: Callable, y: np.ndarray, delta: float) -> Callable:
    """Mean Huber loss of (prediction - y), scaled by 1/delta so gradients are O(1)."""
    scale = 1.0 / (len(y) * delta)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, jac = model(theta)
        r = pred - y
        abs_r = np.abs(r)
        value = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum()
        return value * scale, jac.T @ np.clip(r, -delta, delta) * scale

    return objective


def _minimize_from(objective: Callable, starts: Iterable[np.ndarray],
                   bounds: Sequence[tuple[float | None, float | None]]) -> tuple[np.ndarray, float]:
    best_theta, best_value = None, math.inf
    for start in starts:
        with np.errstate(over="ignore", invalid="ignore"):
            res = minimize(objective, np.asarray(start, dtype=np.float64), jac=True,
                           method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(res.fun) and res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    if best_theta is None:
        raise GLPError("every start of the fit diverged; check the points are on a sensible "
                       "scale (compute in FLOPs, loss > 0)")
    return best_theta, best_value


# Loss law in fit coordinates: x = log C - mean(log C) decorrelates log A from alpha.
# theta = (log A0, alpha, log E) with A = A0 * exp(alpha * mean(log C)).


def _loss_law_model(x_log: np.ndarray) -> Callable:
    def model(theta):
        log_a0, alpha, log_e = theta
        reducible = log_a0 - alpha * x_log
        pred = np.logaddexp(reducible, log_e)
        share = np.exp(reducible - pred)
        return pred, np.column_stack([share, -x_log * share, 1.0 - share])

    return model


def _loss_law_starts(compute: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    mid = math.exp(np.log(loss).mean())
    starts = []
    for alpha in (0.05, 0.1, 0.2, 0.4, 0.8):
        for e_fraction in (1e-3, 0.3, 0.6, 0.9):
            e = e_fraction * loss.min()
            starts.append(np.array([math.log(max(mid - e, 1e-6 * mid)), alpha, math.log(e)]))
    return starts


def _loss_law_bounds(loss: np.ndarray) -> list[tuple[float | None, float | None]]:
    return [(None, None), (1e-6, 10.0), (math.log(loss.min()) - 30.0, math.log(loss.max()))]


def _fit_loss_law(compute: np.ndarray, loss: np.ndarray, delta: float,
                  starts: Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    log_c = np.log(compute)
    objective = _huber_objective(_loss_law_model(log_c - log_c.mean()), np.log(loss), delta)
    starts = _loss_law_starts(compute, loss) if starts is None else starts
    return _minimize_from(objective, starts, _loss_law_bounds(loss))


def _loss_law_coefficients(theta: np.ndarray, compute: np.ndarray) -> tuple[float, float, float]:
    log_a0, alpha, log_e = theta
    return math.exp(log_e), math.exp(log_a0 + alpha * np.log(compute).mean()), float(alpha)


# Saturating law: theta = (a, log b0, beta), prediction a + sign * b0 * exp(-beta * x).


def _saturating_model(x_log: np.ndarray, sign: float) -> Callable:
    def model(theta):
        a, log_b0, beta = theta
        term = np.exp(log_b0 - beta * x_log)
        pred = a + sign * term
        return pred, np.column_stack([np.ones_like(x_log), sign * term, -sign * x_log * term])

    return model


def _saturating_starts(compute: np.ndarray, value: np.ndarray, sign: float) -> list[np.ndarray]:
    span = np.ptp(value) or max(abs(value).max(), 1.0)
    edge = value.max() if sign < 0 else value.min()
    starts = []
    for beta in (0.05, 0.1, 0.2, 0.4, 0.8):
        for margin in (0.01, 0.1, 0.5, 1.0):
            a = edge - sign * margin * span
            gap = abs(a - value.mean())
            starts.append(np.array([a, math.log(max(gap, 1e-9)), beta]))
    return starts


def _fit_saturating(compute: np.ndarray, value: np.ndarray, sign: float, delta: float,
                    starts: Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    log_c = np.log(compute)
    objective = _huber_objective(_saturating_model(log_c - log_c.mean(), sign), value, delta)
    starts = _saturating_starts(compute, value, sign) if starts is None else starts
    return _minimize_from(objective, starts, [(None, None), (None, None), (1e-6, 10.0)])


def _saturating_coefficients(theta: np.ndarray, compute: np.ndarray) -> tuple[float, float, float]:
    a, log_b0, beta = theta
    return float(a), math.exp(log_b0 + beta * np.log(compute).mean()), float(beta)


def _bootstrap(refit: Callable, x: np.ndarray, y: np.ndarray, theta_hat: np.ndarray,
               grid: list[np.ndarray], n_boot: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(theta, resampled x) per bootstrap refit, warm-started at the full-data optimum.

    A few grid starts ride along so a resample whose optimum moved far is still found.
    """
    rng = np.random.default_rng(seed)
    extra = grid[len(grid) // 4:: len(grid) // 2]
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 4:
            continue
        try:
            out.append((refit(x[idx], y[idx], [theta_hat, *extra]), x[idx]))
        except GLPError:
            continue
    return out


def _percentile_intervals(thetas: list[tuple[np.ndarray, np.ndarray]], to_coefficients: Callable,
                          names: Sequence[str], confidence: float) -> dict[str, tuple[float, float]]:
    samples = np.array([to_coefficients(theta, xs) for theta, xs in thetas])
    return _intervals_from_samples(samples, names, confidence)


def _intervals_from_samples(samples: np.ndarray, names: Sequence[str],
                            confidence: float) -> dict[str, tuple[float, float]]:
    if len(samples) < 2:
        raise GLPError(f"only {len(samples)} bootstrap refits succeeded; add points or use "
                       "n_boot=0 to skip the intervals")
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(names)}
