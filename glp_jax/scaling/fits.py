"""The three laws fitted to a sweep, with intervals that say when the data cannot decide.

- Loss vs compute L = E + A·C^-alpha: least squares on log L, profiled over a grid of fixed
  E. For fixed E the law is the line log(L - E) = log A - alpha·log C, so each grid point is
  a cheap fit that needs no starting point; the profile gives the point estimate, a
  likelihood-ratio interval for E, and alpha's interval jointly with E's.
- Downstream vs compute f = a ∓ b·C^-beta: Huber regression profiled over a grid of beta
  (for fixed beta the law is linear in a and b).
- Downstream vs loss f = intercept + slope·L: least squares.

Points of one run share that run's deviation from the law, so they are not independent:
callers pass `groups` (one run id per point) and the bootstrap resamples whole runs. Every
bootstrap refit is the same grid search as the full fit, never started at its estimate. A
fit whose data cannot pin it down says so (`e_identified` / `identified` and a reason): E's
interval then runs to the end of its grid (0 or min L), and a downstream fit reports no
intervals at all. Everything here is numpy/scipy and pure.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats
from scipy.optimize import brentq, minimize_scalar

from glp_jax.errors import GLPError
from glp_jax.scaling.formatting import format_number

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None

# Fixed-E grid of the loss law: 0, then E/min(L) log-spaced towards both ends, so the
# profile is resolved both where the floor is negligible and where it nearly meets the
# lowest loss. The top stays a hair below min(L), where log(L - E) of that point diverges.
E_GRID_POINTS = 128
E_GRID_EDGE = 1e-4
# Fixed-beta grid of the downstream law: beta -> 0 is a straight line in log C (a and b
# then run off to infinity together), beta = 5 saturates within the first decade.
BETA_GRID = (1e-3, 5.0, 96)
MIN_GROUPS = 3  # fewer runs than this give no run-level interval (2 runs: 3 resamples)
MAX_FAILED_FRACTION = 0.1  # more refits failing than this: the fit is unidentified
MAX_SPAN_DECADES = 6.0  # a positive coefficient's interval spanning more: unidentified


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Bootstrap:
    """What a bootstrap resampled, how many refits failed, and its percentile intervals."""

    unit: str  # "run": whole groups resampled; "point": points resampled as independent
    n_groups: int
    n_resamples: int
    n_failed: int
    intervals: dict[str, tuple[float, float]]  # percentile intervals of the refits alone

    def to_dict(self) -> dict:
        return {"unit": self.unit, "n_groups": self.n_groups, "n_resamples": self.n_resamples,
                "n_failed": self.n_failed, "intervals": _intervals_dict(self.intervals)}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> Bootstrap | None:
        if d is None:
            return None
        return cls(str(d["unit"]), int(d["n_groups"]), int(d["n_resamples"]),
                   int(d["n_failed"]), _intervals_from(d.get("intervals", {})))


@dataclass(frozen=True)
class LossLawProfile:
    """The loss law's objective minimised over (A, alpha) at each E of a grid, and what the
    profile says about E: its minimum, a likelihood-ratio interval, whether it is bounded.

    `statistic_grid` is W(E) (0 at the minimum); E is inside the interval where W <= cutoff.
    `variance_ratio` (>= 1) is how much wider correlated runs make the estimate than
    independent points would; W is already divided by it.
    """

    e_grid: np.ndarray
    objective_grid: np.ndarray
    log_a_grid: np.ndarray
    alpha_grid: np.ndarray
    statistic_grid: np.ndarray
    cutoff: float
    dof: int
    variance_ratio: float
    lr_scale: float  # k in W = 2k·(Q - Q_min), the variance ratio included
    E: float
    A: float
    alpha: float
    objective: float
    intervals: dict[str, tuple[float, float]]  # E, A, alpha from the profile alone

    def to_dict(self) -> dict:
        return {"e_grid": _floats(self.e_grid), "objective_grid": _floats(self.objective_grid),
                "log_a_grid": _floats(self.log_a_grid), "alpha_grid": _floats(self.alpha_grid),
                "statistic_grid": _floats(self.statistic_grid), "cutoff": self.cutoff,
                "dof": self.dof, "variance_ratio": self.variance_ratio,
                "lr_scale": self.lr_scale, "E": self.E,
                "A": self.A, "alpha": self.alpha, "objective": self.objective,
                "intervals": _intervals_dict(self.intervals)}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> LossLawProfile | None:
        if d is None:
            return None
        grids = {k: _array(d[k]) for k in ("e_grid", "objective_grid", "log_a_grid",
                                           "alpha_grid", "statistic_grid")}
        return cls(**grids, cutoff=float(d["cutoff"]), dof=int(d["dof"]),
                   variance_ratio=float(d["variance_ratio"]), lr_scale=float(d["lr_scale"]),
                   E=float(d["E"]),
                   A=float(d["A"]), alpha=float(d["alpha"]), objective=_number(d["objective"]),
                   intervals=_intervals_from(d.get("intervals", {})))


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = E + A·C^-alpha at the minimum of the profile over E; intervals from the
    profile and a run-level bootstrap (their union), alpha's jointly with E's."""

    E: float
    A: float
    alpha: float
    compute: np.ndarray  # the points the fit used
    loss: np.ndarray
    intervals: dict[str, tuple[float, float]]  # empty when n_boot == 0
    confidence: float
    n_boot: int
    huber_delta: float | None  # None: least squares on log L
    objective: float
    groups: np.ndarray | None = None  # the run of each point (None: independent points)
    profile: LossLawProfile | None = None
    bootstrap: Bootstrap | None = None
    e_identified: bool = True  # E's interval lies inside (0, min L), touching neither end
    e_reason: str = ""
    e_reaches_zero: bool = False  # E = 0 (no floor) is inside E's interval
    e_reaches_min_loss: bool = False  # so is a floor just under the lowest fitted loss

    law = "L = E + A*C^-alpha"

    @property
    def coefficients(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(compute, dtype=np.float64) ** -self.alpha

    def formula(self, y: str = "L", x: str = "C") -> str:
        return f"{y} = {format_number(self.E)} + {format_number(self.A)}·{x}^-{format_number(self.alpha)}"

    def to_dict(self) -> dict:
        return {**_fit_dict(self, x=self.compute, y=self.loss, names=("compute", "loss")),
                "e_identified": self.e_identified, "e_reason": self.e_reason,
                "e_reaches_zero": self.e_reaches_zero,
                "e_reaches_min_loss": self.e_reaches_min_loss,
                "profile": self.profile.to_dict() if self.profile is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping) -> PowerLawFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("E", "A", "alpha"), ("compute", "loss")),
                   huber_delta=_optional_number(d.get("huber_delta")),
                   objective=_number(d.get("objective")),
                   profile=LossLawProfile.from_dict(d.get("profile")),
                   e_identified=bool(d.get("e_identified", True)),
                   e_reason=str(d.get("e_reason", "")),
                   e_reaches_zero=bool(d.get("e_reaches_zero", False)),
                   e_reaches_min_loss=bool(d.get("e_reaches_min_loss", False)))


@dataclass(frozen=True)
class SaturatingFit:
    """f(C) = a - b·C^-beta (increasing metrics) or a + b·C^-beta (decreasing ones)."""

    a: float
    b: float
    beta: float
    increasing: bool
    compute: np.ndarray
    value: np.ndarray
    intervals: dict[str, tuple[float, float]]  # empty when n_boot == 0 or unidentified
    confidence: float
    n_boot: int
    huber_delta: float | None
    objective: float
    groups: np.ndarray | None = None
    bootstrap: Bootstrap | None = None
    identified: bool = True
    reason: str = ""

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
                "increasing": self.increasing, "identified": self.identified,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping) -> SaturatingFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("a", "b", "beta"), ("compute", "value")),
                   increasing=bool(d["increasing"]),
                   huber_delta=_optional_number(d.get("huber_delta")),
                   objective=_number(d.get("objective")),
                   identified=bool(d.get("identified", True)), reason=str(d.get("reason", "")))


@dataclass(frozen=True)
class LinearFit:
    """f = intercept + slope·L by least squares; bootstrap intervals (by run with groups)."""

    intercept: float
    slope: float
    loss: np.ndarray
    value: np.ndarray
    intervals: dict[str, tuple[float, float]]  # empty when n_boot == 0 or unidentified
    confidence: float
    n_boot: int
    groups: np.ndarray | None = None
    bootstrap: Bootstrap | None = None
    identified: bool = True
    reason: str = ""

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
        return {**_fit_dict(self, x=self.loss, y=self.value, names=("loss", "value")),
                "identified": self.identified, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearFit:
        """The fit back from `to_dict` (or its JSON), so readers predict with the same law."""
        return cls(**_fit_fields(d, ("intercept", "slope"), ("loss", "value")),
                   identified=bool(d.get("identified", True)), reason=str(d.get("reason", "")))


def _fit_dict(fit, *, x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> dict:
    """Coefficients, intervals and the fitted points (x, y; what they are in x_name/y_name)."""
    out = {"law": fit.law, "formula": fit.formula(), **fit.coefficients,
           "intervals": _intervals_dict(fit.intervals),
           "confidence": fit.confidence, "n_boot": fit.n_boot, "n_points": len(x),
           "x_name": names[0], "y_name": names[1], "x": x.tolist(), "y": y.tolist(),
           "groups": None if fit.groups is None else fit.groups.tolist(),
           "bootstrap": None if fit.bootstrap is None else fit.bootstrap.to_dict()}
    if hasattr(fit, "huber_delta"):
        out["huber_delta"] = fit.huber_delta
    return out


def _fit_fields(d: Mapping, coefficients: Sequence[str],
                points: tuple[str, str]) -> dict:
    """The fields every fit class shares, read back from `_fit_dict` output.

    `objective` is not written there; JSON turns NaN into null, so null reads back as NaN.
    """
    groups = d.get("groups")
    return {**{name: _number(d[name]) for name in coefficients},
            points[0]: np.asarray(d["x"], dtype=np.float64),
            points[1]: np.asarray(d["y"], dtype=np.float64),
            "intervals": _intervals_from(d.get("intervals", {})),
            "confidence": float(d["confidence"]), "n_boot": int(d["n_boot"]),
            "groups": None if groups is None else np.asarray(groups),
            "bootstrap": Bootstrap.from_dict(d.get("bootstrap"))}


def _intervals_dict(intervals: Mapping[str, tuple[float, float]]) -> dict:
    return {k: [_json_number(lo), _json_number(hi)] for k, (lo, hi) in intervals.items()}


def _intervals_from(d: Mapping) -> dict[str, tuple[float, float]]:
    return {k: (_number(lo), _number(hi)) for k, (lo, hi) in d.items()}


def _floats(values: np.ndarray) -> list:
    """A float array as a JSON-stable list: non-finite entries become None."""
    return [_json_number(v) for v in np.asarray(values, dtype=np.float64)]


def _array(values: Sequence) -> np.ndarray:
    return np.array([_number(v) for v in values], dtype=np.float64)


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _optional_number(value) -> float | None:
    return None if value is None else float(value)


def _one_blas_thread(fn: Callable) -> Callable:
    """Run `fn` with single-threaded BLAS.

    The fits make thousands of calls on tiny arrays; with a multi-threaded OpenBLAS on a busy
    host each one pays a thread hand-off (measured on 2 loaded cores: a bootstrap ran 25x
    slower).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        limit = (threadpool_limits(1, user_api="blas") if threadpool_limits is not None
                 else contextlib.nullcontext())
        with limit:
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- robust loss


def _rho_psi(r: np.ndarray, delta: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Huber rho(r), psi = rho' and psi' (least squares when delta is None)."""
    if delta is None:
        return 0.5 * r * r, r, np.ones_like(r)
    abs_r = np.abs(r)
    inside = abs_r <= delta
    return (np.where(inside, 0.5 * r * r, delta * (abs_r - 0.5 * delta)),
            np.clip(r, -delta, delta), inside.astype(np.float64))


def _irls_weights(r: np.ndarray, delta: float | None) -> np.ndarray:
    """psi(r)/r: the weights that make a Huber fit a reweighted least-squares fit."""
    if delta is None:
        return np.ones_like(r)
    return np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))


def _lr_scale(r: np.ndarray, delta: float | None, n_params: int) -> float:
    """k in W = 2k·(Q - Q_min): 1/s^2 for least squares (s^2 = RSS/(n - p)); for Huber
    mean(psi')/(sum psi^2/(n - p)), the robust likelihood-ratio scaling that reduces to it."""
    _, psi, dpsi = _rho_psi(r, delta)
    variance = float((psi ** 2).sum()) / max(len(r) - n_params, 1)
    return float(dpsi.mean()) / max(variance, 1e-300)


# ----------------------------------------------------------------------------- loss law


class _FixedEFits(NamedTuple):
    """Per fixed E: log A0 (at the mean log C), alpha, objective, and the objective's
    Gauss-Newton Hessian in (log A0, alpha) (for conditional widths)."""

    log_a0: np.ndarray
    alpha: np.ndarray
    objective: np.ndarray
    hessian: np.ndarray  # [..., 2, 2]
    residuals: np.ndarray  # [n_E, n] log L - log prediction


def loss_law_e_grid(loss: Sequence[float], n: int = E_GRID_POINTS) -> np.ndarray:
    """Fixed E values for the profile: 0, then log-spaced towards 0 and towards min(L)."""
    low = float(np.min(loss))
    k = (n - 1) // 2
    near_zero = low * np.geomspace(E_GRID_EDGE, 0.5, k)
    near_top = low * (1.0 - np.geomspace(E_GRID_EDGE, 0.5, n - 1 - k))[::-1]
    return np.unique(np.concatenate([[0.0], near_zero, near_top]))


def fit_loss_law_fixed_e(compute: Sequence[float], loss: Sequence[float],
                         e_values: Sequence[float], *, huber_delta: float | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log A, alpha, objective) of L = E + A·C^-alpha for each fixed E < min(L).

    Least squares (Huber with `huber_delta`) on log L; objective = sum of rho(log residual).
    Starts from the weighted line log(L - E) = log A - alpha·log C, weights ((L - E)/L)^2
    making its residuals those of log L to first order, then Gauss-Newton on log L.
    """
    x, y = _check_xy(compute, loss, "compute", "loss", min_points=3, positive_y=True)
    e = np.asarray(e_values, dtype=np.float64).reshape(-1)
    if (e < 0).any() or (e >= y.min()).any():
        raise GLPError(f"fixed E must lie in [0, min(loss) = {y.min():.6g}); got "
                       f"{e[(e < 0) | (e >= y.min())][:3].tolist()}")
    log_c = np.log(x)
    fits = _fixed_e_fits(log_c - log_c.mean(), np.log(y), y, e, huber_delta)
    return fits.log_a0 + fits.alpha * log_c.mean(), fits.alpha, fits.objective


def _fixed_e_fits(x: np.ndarray, log_loss: np.ndarray, loss: np.ndarray, e: np.ndarray,
                  delta: float | None, max_iter: int | None = None, tol: float = 1e-10,
                  counts: np.ndarray | None = None) -> _FixedEFits:
    """`fit_loss_law_fixed_e` on centred log C = x, vectorised over the E values.

    `counts` [n_E, n] weighs each point by how often a resample holds it (0: left out; such
    points may lie below E). Least squares converges in a few steps (more near E = min L);
    reweighting for Huber converges linearly, so it gets more.
    """
    max_iter = max_iter if max_iter is not None else 30 if delta is None else 300
    counts = np.ones((1, len(x))) if counts is None else counts
    e_col = e[:, None]
    gap = np.where(counts > 0, loss[None, :] - e_col, loss[None, :])
    log_a0, alpha = _weighted_line(x, np.log(gap), counts * (gap / loss[None, :]) ** 2)
    with np.errstate(divide="ignore"):
        log_e = np.log(e_col)

    def evaluate(log_a0, alpha):
        reducible = log_a0[:, None] - alpha[:, None] * x
        log_pred = np.logaddexp(reducible, log_e)
        r = log_loss - log_pred
        return r, np.exp(reducible - log_pred), (counts * _rho_psi(r, delta)[0]).sum(axis=1)

    r, share, q = evaluate(log_a0, alpha)
    active = np.isfinite(q)
    for _ in range(max_iter):
        # Gauss-Newton (reweighted for Huber) in (log A0, alpha): d log_pred = share·(1, -x).
        w = counts * _irls_weights(r, delta)
        d_a0, d_alpha = _solve_2x2(*_normal_equations(share, -x * share, w, r))
        d_a0, d_alpha = np.where(active, d_a0, 0.0), np.where(active, d_alpha, 0.0)
        step = np.ones_like(log_a0)
        for _ in range(12):  # halve the step where the objective would rise
            r_new, share_new, q_new = evaluate(log_a0 + step * d_a0, alpha + step * d_alpha)
            worse = ~(q_new <= q * (1.0 + 1e-13))
            if not worse.any():
                break
            step = np.where(worse, 0.5 * step, step)
        step = np.where(worse, 0.0, step)  # rows that never improved keep their values
        log_a0, alpha = log_a0 + step * d_a0, alpha + step * d_alpha
        r = np.where(worse[:, None], r, r_new)
        share = np.where(worse[:, None], share, share_new)
        q = np.where(worse, q, q_new)
        active &= np.maximum(np.abs(step * d_a0), np.abs(step * d_alpha)) > tol
        if not active.any():
            break
    dpsi = counts * _rho_psi(r, delta)[2]
    h_aa, h_av, h_vv, _, _ = _normal_equations(share, -x * share, dpsi, r)
    hessian = np.stack([np.stack([h_aa, h_av], -1), np.stack([h_av, h_vv], -1)], -2)
    return _FixedEFits(log_a0, alpha, q, hessian, r)


def _weighted_line(x: np.ndarray, z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intercept, -slope) of the weighted least-squares line z ~ x, one per row of z, w."""
    sw, sx, sxx = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
    sz, sxz = (w * z).sum(1), (w * x * z).sum(1)
    slope = (sw * sxz - sx * sz) / (sw * sxx - sx ** 2)
    return (sz - slope * sx) / sw, -slope


def _normal_equations(u, v, w, r):
    """Entries of J^T W J and J^T W r for the Jacobian columns u, v (rows: problems)."""
    return ((w * u * u).sum(1), (w * u * v).sum(1), (w * v * v).sum(1),
            (w * u * r).sum(1), (w * v * r).sum(1))


def _solve_2x2(m_uu, m_uv, m_vv, g_u, g_v):
    det = m_uu * m_vv - m_uv ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (m_vv * g_u - m_uv * g_v) / det, (m_uu * g_v - m_uv * g_u) / det


class _LossLawData(NamedTuple):
    x: np.ndarray  # log C - mean log C
    x_mean: float
    log_loss: np.ndarray
    loss: np.ndarray
    delta: float | None
    tol: float  # Gauss-Newton stops when no parameter moves more than this

    @classmethod
    def of(cls, compute, loss, delta, tol: float = 1e-10):
        log_c = np.log(compute)
        return cls(log_c - log_c.mean(), float(log_c.mean()), np.log(loss), loss, delta, tol)

    def fits(self, e: np.ndarray) -> _FixedEFits:
        return _fixed_e_fits(self.x, self.log_loss, self.loss, np.asarray(e, np.float64),
                             self.delta, tol=self.tol)

    def objective(self, e: float) -> float:
        return float(self.fits(np.array([e])).objective[0])


def profile_loss_law(compute: Sequence[float], loss: Sequence[float], *,
                     groups: Sequence | None = None, huber_delta: float | None = None,
                     confidence: float = 0.95, n_grid: int = E_GRID_POINTS) -> LossLawProfile:
    """The profile of the loss law over E: its minimum and a likelihood-ratio interval.

    W(E) = 2k·(Q(E) - Q_min), Q the objective minimised over (A, alpha) at fixed E and k as
    in `_lr_scale`: for least squares W = (RSS(E) - RSS_min)/s^2, the F statistic of fixing
    one parameter (exact in a linear model, chi2(1) asymptotically), so E's interval is
    {E: W(E) <= F_{1,nu}(confidence)}. With independent points nu = n - 3. With `groups`
    (one run id per point) the points of a run share its deviation from the law, so W is
    divided by the ratio (kept >= 1) of the cluster-robust to the model variance of
    (E, alpha) at the minimum, and nu = n_groups - 1, the sandwich's degrees of freedom.
    alpha's (and A's) interval is joint: every value the law takes inside that region.
    """
    x_c, y = _check_xy(compute, loss, "compute", "loss", min_points=4, positive_y=True)
    data = _LossLawData.of(x_c, y, huber_delta)
    grid = loss_law_e_grid(y, n_grid)
    fits = data.fits(grid)
    e_hat, best = _refined_minimum(data, grid, fits.objective)
    n_params = 3
    scale = _lr_scale(best.residuals[0], huber_delta, n_params)
    dof, variance_ratio = len(y) - n_params, 1.0
    group_ids = _group_ids(groups, len(y))
    n_groups = int(group_ids.max()) + 1
    if n_groups < len(y):
        variance_ratio = _variance_ratio(data, group_ids, e_hat, best)
        dof = max(n_groups - 1, 1)
    scale /= variance_ratio
    cutoff = float(stats.f.ppf(confidence, 1, dof))
    q_min = float(best.objective[0])
    statistic = np.maximum(2.0 * scale * (fits.objective - q_min), 0.0)
    statistic = np.where(np.isfinite(statistic), statistic, np.inf)
    e_lo, e_hi = _interval_on_grid(grid, statistic, cutoff, e_hat,
                                   lambda e: 2.0 * scale * (data.objective(e) - q_min) - cutoff)
    log_a_lo, log_a_hi, alpha_lo, alpha_hi = _joint_ranges(
        data, grid, e_lo, e_hi, e_hat, lambda obj: 2.0 * scale * (obj - q_min), scale, cutoff)
    alpha_hat = float(best.alpha[0])
    log_a_hat = float(best.log_a0[0]) + alpha_hat * data.x_mean
    return LossLawProfile(
        grid, fits.objective, fits.log_a0 + fits.alpha * data.x_mean, fits.alpha, statistic,
        cutoff, dof, variance_ratio, scale, e_hat, math.exp(log_a_hat), alpha_hat, q_min,
        {"E": (e_lo, e_hi), "A": (math.exp(log_a_lo), math.exp(log_a_hi)),
         "alpha": (alpha_lo, alpha_hi)})


def _refined_minimum(data: _LossLawData, grid: np.ndarray,
                     objective: np.ndarray) -> tuple[float, _FixedEFits]:
    """The profile's minimum: the best grid point, then Brent between its neighbours."""
    if not np.isfinite(objective).any():
        raise GLPError("the loss law could not be fitted at any E; check the points are on a "
                       "sensible scale (compute in FLOPs, loss > 0)")
    k = int(np.nanargmin(np.where(np.isfinite(objective), objective, np.nan)))
    e_best, q_best = float(grid[k]), float(objective[k])
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(data.objective, bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-13 * max(hi, 1e-300)})
    if np.isfinite(res.fun) and res.fun < q_best:
        e_best = float(res.x)
    return e_best, data.fits(np.array([e_best]))


def _interval_on_grid(grid: np.ndarray, statistic: np.ndarray, cutoff: float, e_hat: float,
                      excess: Callable[[float], float]) -> tuple[float, float]:
    """The hull of {E: W(E) <= cutoff}: grid ends where W stays below, else the crossing."""
    inside = np.flatnonzero(statistic <= cutoff)
    if not len(inside):
        return e_hat, e_hat
    first, last = inside[0], inside[-1]

    def crossing(i, j, fallback):
        try:
            return float(brentq(excess, grid[i], grid[j], xtol=1e-14 * grid[-1]))
        except ValueError:  # no sign change at the refined ends: keep the grid point
            return float(fallback)

    lo = float(grid[0]) if first == 0 else crossing(first - 1, first, grid[first])
    hi = float(grid[-1]) if last == len(grid) - 1 else crossing(last, last + 1, grid[last])
    return min(lo, e_hat), max(hi, e_hat)


def _joint_ranges(data: _LossLawData, grid: np.ndarray, e_lo: float, e_hi: float,
                  e_hat: float, statistic_of: Callable, scale: float,
                  cutoff: float) -> tuple[float, float, float, float]:
    """(log A lo, hi, alpha lo, hi) over every E in [e_lo, e_hi], each widened by its own
    conditional interval at that E where W(E) leaves room below the cutoff."""
    e = np.unique(np.concatenate([grid[(grid >= e_lo) & (grid <= e_hi)],
                                  np.linspace(e_lo, e_hi, 65), [e_hat]]))
    fits = data.fits(e)
    ok = np.isfinite(fits.objective)
    slack = np.clip(cutoff - statistic_of(fits.objective), 0.0, None)
    h = fits.hessian
    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        # Variance of alpha and of log A = log A0 + alpha·mean(log C) under (H/k)^-1.
        var_alpha = h[:, 0, 0] / det
        g = np.array([1.0, data.x_mean])
        var_log_a = (g[0] ** 2 * h[:, 1, 1] - 2 * g[0] * g[1] * h[:, 0, 1]
                     + g[1] ** 2 * h[:, 0, 0]) / det
        width_alpha = np.where(slack > 0, np.sqrt(slack / scale * var_alpha), 0.0)
        width_log_a = np.where(slack > 0, np.sqrt(slack / scale * var_log_a), 0.0)
    alpha = fits.alpha
    log_a = fits.log_a0 + fits.alpha * data.x_mean
    ok &= np.isfinite(width_alpha) & np.isfinite(width_log_a)
    if not ok.any():
        return -math.inf, math.inf, -math.inf, math.inf
    return (float((log_a - width_log_a)[ok].min()), float((log_a + width_log_a)[ok].max()),
            float((alpha - width_alpha)[ok].min()), float((alpha + width_alpha)[ok].max()))


def _variance_ratio(data: _LossLawData, group_ids: np.ndarray, e_hat: float,
                    best: _FixedEFits) -> float:
    """max(1, cluster-robust / model variance) over E and alpha at the optimum.

    The sandwich sums each run's score before squaring, so a run's shared deviation counts
    once; CR1's G/(G-1) corrects its small-sample shrinkage. Never below 1: with a handful
    of runs the sandwich is noisy, and it must not narrow the interval.
    """
    log_a0, alpha = float(best.log_a0[0]), float(best.alpha[0])
    reducible = log_a0 - alpha * data.x
    with np.errstate(divide="ignore"):
        log_pred = np.logaddexp(reducible, math.log(e_hat) if e_hat > 0 else -np.inf)
    share = np.exp(reducible - log_pred)
    jac = np.column_stack([share, -data.x * share, np.exp(-log_pred)])  # d log_pred / (a0, alpha, E)
    _, psi, dpsi = _rho_psi(data.log_loss - log_pred, data.delta)
    n, p = jac.shape
    n_groups = int(group_ids.max()) + 1
    scores = np.zeros((n_groups, p))
    np.add.at(scores, group_ids, jac * psi[:, None])
    bread = np.linalg.pinv((jac * dpsi[:, None]).T @ jac)
    robust = bread @ (scores.T @ scores) @ bread * n_groups / max(n_groups - 1, 1)
    model = (np.linalg.pinv(jac.T @ jac) * float((psi ** 2).sum()) / max(n - p, 1)
             / max(float(dpsi.mean()), 1e-12) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.diag(robust)[1:] / np.diag(model)[1:]
    ratios = ratios[np.isfinite(ratios)]
    return float(max(1.0, *ratios)) if len(ratios) else 1.0


def _loss_law_minima(compute: np.ndarray, loss: np.ndarray, counts: np.ndarray,
                     delta: float | None, n_grid: int) -> np.ndarray:
    """[B, 3] (E, A, alpha) at the profile minimum of each resample (`counts` [B, n]: how
    often it holds each point): the bootstrap refits. Each is a grid search over its own
    E grid (up to its own lowest loss) and a zoom, started from nothing but the resample.
    Gauss-Newton stops at 1e-7 in (log A, alpha): far below the spread of the refits."""
    data = _LossLawData.of(compute, loss, delta, tol=1e-7)
    lowest = np.where(counts > 0, loss, np.inf).min(axis=1)
    grid_BxG = lowest[:, None] * (loss_law_e_grid([1.0], n_grid))[None, :]

    def fits_of(e_BxK: np.ndarray) -> _FixedEFits:
        k = e_BxK.shape[1]
        return _fixed_e_fits(data.x, data.log_loss, loss, e_BxK.reshape(-1), delta,
                             tol=data.tol, counts=np.repeat(counts, k, axis=0))

    e_B = _batched_argmin(lambda e: fits_of(e).objective.reshape(e.shape), grid_BxG)
    best = fits_of(e_B[:, None])
    log_a = best.log_a0 + best.alpha * data.x_mean
    return np.column_stack([e_B, np.exp(log_a), best.alpha])


def _batched_argmin(objective_of: Callable[[np.ndarray], np.ndarray], grid_BxG: np.ndarray,
                    zoom: int = 17) -> np.ndarray:
    """Per row, the argmin of a 1-D profile over that row's grid, refined on a finer grid
    between the best point's neighbours and by the parabola through the best three there
    (NaN where a row's profile is nowhere finite). `objective_of` maps [B, K] values to
    [B, K] objectives, row b using resample b."""
    rows = np.arange(len(grid_BxG))
    q = _finite_or_inf(objective_of(grid_BxG))
    k = q.argmin(axis=1)
    lo = grid_BxG[rows, np.maximum(k - 1, 0)]
    hi = grid_BxG[rows, np.minimum(k + 1, grid_BxG.shape[1] - 1)]
    fine = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, zoom)[None, :]
    q_fine = _finite_or_inf(objective_of(fine))
    j = np.clip(q_fine.argmin(axis=1), 1, zoom - 2)
    x0, x1, x2 = (fine[rows, j + d] for d in (-1, 0, 1))
    y0, y1, y2 = (q_fine[rows, j + d] for d in (-1, 0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = y0 - 2 * y1 + y2
        vertex = x1 + 0.5 * (x1 - x0) * (y0 - y2) / curvature
    vertex = np.where((curvature > 0) & (vertex > x0) & (vertex < x2), vertex, x1)
    q_vertex = _finite_or_inf(objective_of(vertex[:, None]))[:, 0]
    best_fine = fine[rows, q_fine.argmin(axis=1)]
    best = np.where(q_vertex < q_fine.min(axis=1), vertex, best_fine)
    return np.where(np.isfinite(q.min(axis=1)), best, np.nan)


def _finite_or_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.inf)


@_one_blas_thread
def fit_power_law(compute: Sequence[float], loss: Sequence[float], *,
                  groups: Sequence | None = None, huber_delta: float | None = None,
                  n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                  n_grid: int = E_GRID_POINTS) -> PowerLawFit:
    """Fit L = E + A·C^-alpha by least squares on log L, profiled over E.

    The estimate is the profile's minimum (`profile_loss_law`). `groups` gives the run of
    each point; `n_boot` refits on whole runs resampled with replacement (points, without
    groups), each a cold grid search, give percentile intervals. The reported intervals
    are the union of the profile's and the bootstrap's, and alpha's and A's also cover the
    best fit at every E inside E's interval: they are joint with E (0 skips the intervals).
    `e_identified` is False when E's interval reaches 0 or min(L), with the reason.
    """
    x, y = _check_xy(compute, loss, "compute", "loss", min_points=4, positive_y=True)
    group_ids = _group_ids(groups, len(y))
    profile = profile_loss_law(x, y, groups=groups, huber_delta=huber_delta,
                               confidence=confidence, n_grid=n_grid)
    intervals, bootstrap = {}, None
    if n_boot:
        bootstrap = _run_bootstrap(
            lambda counts: _loss_law_minima(x, y, counts, huber_delta, n_grid), x, group_ids,
            groups is not None, ("E", "A", "alpha"), n_boot, seed, confidence)
        e_lo, e_hi = _union(profile.intervals["E"], bootstrap.intervals.get("E"))
        # A resample without the lowest point may put E above this data's min L, where the
        # law cannot pass under that point: the grid's top is as far as E's interval goes.
        e_hi = min(e_hi, float(profile.e_grid[-1]))
        k, q_min = profile.lr_scale, profile.objective
        log_a_lo, log_a_hi, alpha_lo, alpha_hi = _joint_ranges(
            _LossLawData.of(x, y, huber_delta), profile.e_grid, e_lo, e_hi, profile.E,
            lambda obj: 2.0 * k * (obj - q_min), k, profile.cutoff)
        intervals = {
            "E": (e_lo, e_hi),
            "A": _union((math.exp(log_a_lo), math.exp(log_a_hi)), profile.intervals["A"],
                        bootstrap.intervals.get("A")),
            "alpha": _union((alpha_lo, alpha_hi), profile.intervals["alpha"],
                            bootstrap.intervals.get("alpha")),
        }
    at_zero, at_top, e_reason = _e_identification(
        profile, intervals.get("E", profile.intervals["E"]), y, confidence)
    problems = _bootstrap_problems(bootstrap)
    if problems:
        e_reason += " (bootstrap: " + "; ".join(problems) + ")"
    return PowerLawFit(profile.E, profile.A, profile.alpha, x, y, intervals, confidence, n_boot,
                       huber_delta, profile.objective,
                       None if groups is None else np.asarray(groups), profile, bootstrap,
                       not (at_zero or at_top), e_reason, at_zero, at_top)


def bootstrap_fit(compute: Sequence[float], loss: Sequence[float], n_boot: int = 1000,
                  seed: int = 0, *, groups: Sequence | None = None,
                  huber_delta: float | None = None,
                  confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """The intervals of `fit_power_law` for E, A, alpha (profile and bootstrap, joint)."""
    if n_boot < 1:
        raise GLPError(f"n_boot={n_boot}; the bootstrap needs at least one resample (use ~1000)")
    fit = fit_power_law(compute, loss, groups=groups, huber_delta=huber_delta, n_boot=n_boot,
                        seed=seed, confidence=confidence)
    return fit.intervals


def _e_identification(profile: LossLawProfile, e_interval: tuple[float, float],
                      loss: np.ndarray, confidence: float) -> tuple[bool, bool, str]:
    """(reaches 0, reaches min L, the reason in words) for E's interval.

    An end counts as reached when the interval enters the grid's first or last cell: a
    refit there sits at the edge of what the grid can tell apart from the end itself.
    """
    lo, hi = e_interval
    low = float(loss.min())
    pct = f"{100 * confidence:g}%"
    at_zero, at_top = bool(lo < profile.e_grid[1]), bool(hi > profile.e_grid[-2])
    text = f"[{format_number(lo)}, {format_number(hi)}]"
    if not (at_zero or at_top):
        return False, False, (f"E's {pct} interval {text} lies inside (0, min L = "
                              f"{format_number(low)})")
    ends = []
    if at_zero:
        ends.append("reaches E = 0: a pure power law (no floor) fits these points as well")
    if at_top:
        ends.append(f"reaches the lowest fitted loss ({format_number(low)}): a floor just under "
                    "the lowest point fits as well")
    return at_zero, at_top, (f"E unidentified: its {pct} interval {text} " + " and ".join(ends)
                             + "; alpha's interval is joint, over every E in that range")


def _union(*intervals: tuple[float, float] | None) -> tuple[float, float]:
    given = [iv for iv in intervals if iv is not None]
    return min(lo for lo, _ in given), max(hi for _, hi in given)


# ----------------------------------------------------------------------------- bootstrap


def _group_ids(groups: Sequence | None, n: int) -> np.ndarray:
    """Dense ids 0..G-1 per point (each point its own group when `groups` is None)."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups).reshape(-1)
    if len(groups) != n:
        raise GLPError(f"groups has {len(groups)} entries for {n} points; pass one run id per "
                       "point (the run each point comes from)")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def group_resamples(groups: Sequence, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Point indices of `n_boot` resamples that draw whole groups with replacement.

    A resample holds as many groups as the data (some twice, some not at all), each with
    all its points, so the correlation inside a run travels with it.
    """
    ids = _group_ids(groups, len(np.asarray(groups).reshape(-1)))
    order = np.argsort(ids, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def resample_counts(groups: Sequence, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n] how often each point appears in each of `group_resamples`' resamples."""
    n = len(np.asarray(groups).reshape(-1))
    return np.array([np.bincount(idx, minlength=n)
                     for idx in group_resamples(groups, n_boot, seed)], dtype=np.float64)


def _run_bootstrap(refit: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                   group_ids: np.ndarray, by_run: bool, names: Sequence[str], n_boot: int,
                   seed: int, confidence: float, min_distinct: int = 4,
                   chunk: int = 64) -> Bootstrap:
    """Percentile intervals of refits on resamples of whole groups.

    `refit(counts)` maps [B, n] point multiplicities (`resample_counts`) to [B, p]
    coefficients, NaN where it fails; it sees only the resamples, no starting point from the
    full-data fit. A resample with too few distinct x, or whose refit fails, counts in
    `n_failed`. Fewer than MIN_GROUPS runs give no run-level interval at all (2 runs have 3
    distinct resamples).
    """
    n_groups = int(group_ids.max()) + 1
    unit = "run" if by_run else "point"
    if by_run and n_groups < MIN_GROUPS:
        return Bootstrap(unit, n_groups, 0, 0, {})
    counts = resample_counts(group_ids, n_boot, seed)
    _, x_ids = np.unique(x, return_inverse=True)
    distinct = np.array([len(np.unique(x_ids[c > 0])) for c in counts])
    counts = counts[distinct >= min_distinct]
    samples = np.empty((0, len(names)))
    if len(counts):
        with np.errstate(all="ignore"):
            samples = np.concatenate([refit(counts[i:i + chunk])
                                      for i in range(0, len(counts), chunk)])
    samples = samples[np.isfinite(samples).all(axis=1)]
    intervals = {}
    if len(samples) >= 2:
        tail = 50.0 * (1.0 - confidence)
        lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
        intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(names)}
    return Bootstrap(unit, n_groups, n_boot, n_boot - len(samples), intervals)


def _bootstrap_problems(bootstrap: Bootstrap | None) -> list[str]:
    """Why a bootstrap gives no usable interval (empty list: it does)."""
    if bootstrap is None:
        return []
    if bootstrap.n_resamples == 0:
        return [f"only {bootstrap.n_groups} run(s): a run-level bootstrap needs >= {MIN_GROUPS}"]
    problems = []
    if bootstrap.n_failed > MAX_FAILED_FRACTION * bootstrap.n_resamples:
        problems.append(f"{bootstrap.n_failed} of {bootstrap.n_resamples} bootstrap refits "
                        "failed")
    if not bootstrap.intervals:
        problems.append("too few bootstrap refits succeeded for an interval")
    for name, (lo, hi) in bootstrap.intervals.items():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            problems.append(f"{name}'s interval is not finite")
    return problems


# ----------------------------------------------------------------------------- downstream


class _SaturatingFits(NamedTuple):
    """Per fixed beta: a, b0 = b·C_mean^-beta (>= 0), objective, b0 held at 0."""

    a: np.ndarray
    b0: np.ndarray
    objective: np.ndarray
    clamped: np.ndarray


def _saturating_fixed_beta(x: np.ndarray, value: np.ndarray, beta: np.ndarray, sign: float,
                           delta: float | None, max_iter: int = 50,
                           counts: np.ndarray | None = None) -> _SaturatingFits:
    """f = a + sign·b0·exp(-beta·x) at each fixed beta: linear in (a, b0), so (reweighted)
    least squares with b0 >= 0 (b0 held at 0 and a the weighted mean when the data slope
    the other way). `counts` [n_beta, n] weighs the points as in `_fixed_e_fits`."""
    t = np.exp(-np.asarray(beta, np.float64)[:, None] * x[None, :])
    counts = np.ones_like(t) if counts is None else counts
    w = counts
    for _ in range(max_iter if delta is not None else 1):
        sw, st, stt = w.sum(1), (w * t).sum(1), (w * t * t).sum(1)
        sv, stv = (w * value).sum(1), (w * t * value).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = (sw * stv - st * sv) / (sw * stt - st ** 2)
        clamped = ~(sign * c > 0)
        c = np.where(clamped, 0.0, c)
        a = (sv - c * st) / sw
        r = value - a[:, None] - c[:, None] * t
        w_next = counts * _irls_weights(r, delta)
        if np.abs(w_next - w).max() < 1e-12:
            break
        w = w_next
    return _SaturatingFits(a, sign * c, (counts * _rho_psi(r, delta)[0]).sum(1), clamped)


def _beta_grid() -> np.ndarray:
    lo, hi, n = BETA_GRID
    return np.geomspace(lo, hi, n)


def _saturating_minimum(compute: np.ndarray, value: np.ndarray, sign: float,
                        delta: float | None) -> tuple[float, float, float, bool, float]:
    """(a, b, beta, at a bound, objective) at the minimum over beta of the profile: the
    best point of the beta grid, refined by Brent in log beta between its neighbours."""
    log_c = np.log(compute)
    x, x_mean = log_c - log_c.mean(), float(log_c.mean())
    grid = _beta_grid()

    def fits_of(betas):
        return _saturating_fixed_beta(x, value, np.asarray(betas, np.float64), sign, delta)

    q = fits_of(grid).objective
    k = int(np.argmin(q))
    lo, hi = np.log(grid[max(k - 1, 0)]), np.log(grid[min(k + 1, len(grid) - 1)])
    res = minimize_scalar(lambda lb: float(fits_of([math.exp(lb)]).objective[0]),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-11})
    beta = math.exp(res.x) if res.fun < q[k] else float(grid[k])
    best = fits_of([beta])
    at_edge = abs(math.log(beta / grid[0])) < 1e-6 or abs(math.log(beta / grid[-1])) < 1e-6
    b0 = float(best.b0[0])
    return (float(best.a[0]), b0 * math.exp(beta * x_mean), beta,
            bool(at_edge or best.clamped[0]), float(best.objective[0]))


def _saturating_minima(compute: np.ndarray, value: np.ndarray, counts: np.ndarray,
                       sign: float, delta: float | None) -> np.ndarray:
    """[B, 3] (a, b, beta) at the profile minimum of each resample: the bootstrap refits,
    a grid search over log beta and a zoom, started from nothing but the resample."""
    log_c = np.log(compute)
    x, x_mean = log_c - log_c.mean(), float(log_c.mean())
    log_grid_BxG = np.broadcast_to(np.log(_beta_grid()), (len(counts), BETA_GRID[2]))

    def fits_of(log_beta_BxK: np.ndarray) -> _SaturatingFits:
        k = log_beta_BxK.shape[1]
        return _saturating_fixed_beta(x, value, np.exp(log_beta_BxK).reshape(-1), sign, delta,
                                      counts=np.repeat(counts, k, axis=0))

    log_beta = _batched_argmin(lambda lb: fits_of(lb).objective.reshape(lb.shape),
                               log_grid_BxG)
    best = fits_of(log_beta[:, None])
    beta = np.exp(log_beta)
    return np.column_stack([best.a, best.b0 * np.exp(beta * x_mean), beta])


@_one_blas_thread
def fit_downstream_vs_compute(compute: Sequence[float], value: Sequence[float], *,
                              groups: Sequence | None = None, increasing: bool | None = None,
                              huber_delta: float | None = 1e-3, n_boot: int = 1000,
                              seed: int = 0, confidence: float = 0.95) -> SaturatingFit:
    """Fit f(C) = a - b·C^-beta (or a + b·C^-beta for metrics that fall with compute).

    Huber loss in the metric's own units (a metric such as AUC can be near 0 or 1, so no
    logs), profiled over a grid of beta. `increasing=None` reads the direction from the sign
    of the correlation between f and log C. Intervals come from a bootstrap over `groups`
    (runs; points without them), every refit the same grid search. The fit is reported
    unidentified (`identified=False`, `reason`, no intervals) when b = 0 or beta is at its
    grid's edge, when refits fail, or when beta's interval reaches the grid's edge or b's
    spans more than MAX_SPAN_DECADES: a, b and beta then trade off without bound.
    """
    x, y = _check_xy(compute, value, "compute", "value", min_points=4)
    group_ids = _group_ids(groups, len(y))
    if increasing is None:
        increasing = bool(np.corrcoef(np.log(x), y)[0, 1] >= 0) if np.ptp(y) > 0 else True
    sign = -1.0 if increasing else 1.0
    a, b, beta, at_bound, objective = _saturating_minimum(x, y, sign, huber_delta)
    problems = []
    if at_bound:
        problems.append(_saturating_bound_text(b, beta))
    bootstrap = None
    if n_boot:
        bootstrap = _run_bootstrap(
            lambda counts: _saturating_minima(x, y, counts, sign, huber_delta), x, group_ids,
            groups is not None, ("a", "b", "beta"), n_boot, seed, confidence)
        problems += _bootstrap_problems(bootstrap) + _saturating_interval_problems(bootstrap)
    identified = not problems
    intervals = dict(bootstrap.intervals) if bootstrap is not None and identified else {}
    reason = "" if identified else "fit unidentified: " + "; ".join(problems)
    return SaturatingFit(a, b, beta, increasing, x, y, intervals, confidence, n_boot,
                         huber_delta, objective, None if groups is None else np.asarray(groups),
                         bootstrap, identified, reason)


def _saturating_bound_text(b: float, beta: float) -> str:
    lo, hi, _ = BETA_GRID
    if b == 0:
        return "b = 0 at the optimum: no power-law term in the direction the metric moves"
    return (f"beta = {format_number(beta)} is at the edge of its grid [{format_number(lo)}, "
            f"{format_number(hi)}]" + (": the points are a straight line in log C, so a and b "
                                       "grow without bound together" if beta <= lo * 1.01 else
                                       ": the metric has saturated within the first points"))


def _saturating_interval_problems(bootstrap: Bootstrap) -> list[str]:
    iv = bootstrap.intervals
    if not iv:
        return []
    lo, hi, _ = BETA_GRID
    problems = []
    b_lo, b_hi = iv["b"]
    beta_lo, beta_hi = iv["beta"]
    if beta_lo <= lo * (1 + 1e-6) or beta_hi >= hi * (1 - 1e-6):
        problems.append(f"beta's bootstrap interval [{format_number(beta_lo)}, "
                        f"{format_number(beta_hi)}] reaches the edge of its grid")
    if not b_lo > 0 or not b_hi / b_lo <= 10 ** MAX_SPAN_DECADES:
        problems.append(f"b's bootstrap interval [{format_number(b_lo)}, {format_number(b_hi)}] "
                        f"spans more than {MAX_SPAN_DECADES:g} orders of magnitude or reaches 0")
    return problems


@_one_blas_thread
def fit_linear_vs_loss(loss: Sequence[float], value: Sequence[float], *,
                       groups: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> LinearFit:
    """Fit f = intercept + slope·L by least squares (the paper's downstream-vs-loss lines).

    Intervals from a bootstrap over `groups` (runs; points without them); unidentified
    (no intervals, `reason`) when too few runs or too many refits fail.
    """
    x, y = _check_xy(loss, value, "loss", "value", min_points=3, positive_x=False)
    group_ids = _group_ids(groups, len(y))
    intercept, slope = _linear(x, y)
    bootstrap, problems = None, []
    if n_boot:
        bootstrap = _run_bootstrap(lambda counts: _weighted_lines(x, y, counts), x, group_ids,
                                   groups is not None, ("intercept", "slope"), n_boot, seed,
                                   confidence, min_distinct=2)
        problems = _bootstrap_problems(bootstrap)
    identified = not problems
    intervals = dict(bootstrap.intervals) if bootstrap is not None and identified else {}
    reason = "" if identified else "fit unidentified: " + "; ".join(problems)
    return LinearFit(intercept, slope, x, y, intervals, confidence, n_boot,
                     None if groups is None else np.asarray(groups), bootstrap, identified,
                     reason)


def _linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def _weighted_lines(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, 2] (intercept, slope) of least squares on each resample (`counts` [B, n])."""
    intercept, minus_slope = _weighted_line(x, np.broadcast_to(y, counts.shape), counts)
    return np.column_stack([intercept, -minus_slope])


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
