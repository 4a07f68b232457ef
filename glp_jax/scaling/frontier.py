"""Loss curves over compute and their compute-efficient frontier (lower envelope).

The paper's method takes the intermediate checkpoints of one cosine run per depth as the data
axis and fits the loss law on the lower envelope of those curves. Intermediate checkpoints are
not compute-optimal for their budget (the learning rate has not annealed yet), so the frontier
records exactly which logged points lie on it. One-run-per-budget sweeps use `final_only=True`
instead: only each run's last point counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.scaling.runs import COMPUTE_6ND, METRICS_FILE, Run


@dataclass(frozen=True)
class Curve:
    """One run's (compute, value) points sorted by compute; `rows` index back into Run.rows."""

    name: str
    compute: np.ndarray
    value: np.ndarray
    rows: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        compute = np.asarray(self.compute, dtype=np.float64).reshape(-1)
        value = np.asarray(self.value, dtype=np.float64).reshape(-1)
        rows = np.arange(len(compute)) if self.rows is None else np.asarray(self.rows).reshape(-1)
        if not len(compute) == len(value) == len(rows):
            raise GLPError(f"curve {self.name!r}: compute, value and rows differ in length "
                           f"({len(compute)}, {len(value)}, {len(rows)}); pass aligned arrays")
        order = np.argsort(compute, kind="stable")
        object.__setattr__(self, "compute", compute[order])
        object.__setattr__(self, "value", value[order])
        object.__setattr__(self, "rows", rows[order].astype(np.int64))

    def __len__(self) -> int:
        return len(self.compute)

    def last(self) -> Curve:
        """The final point only (one-run-per-budget sweeps)."""
        return Curve(self.name, self.compute[-1:], self.value[-1:], self.rows[-1:])


def run_curve(run: Run, column: str, *, compute_column: str = COMPUTE_6ND,
              min_activations: float = 0.0, positive: bool = False) -> Curve:
    """The rows of `run` with a finite `column` and C > 0, as a Curve over compute.

    Rows with activations_seen <= min_activations (e.g. warm-up) are dropped; `positive`
    also drops values <= 0 (needed before taking logs).
    """
    compute = run.compute(compute_column)
    value = run.column(column)
    seen = run.column("activations_seen")
    keep = np.isfinite(compute) & (compute > 0) & np.isfinite(value) & ~(seen <= min_activations)
    if positive:
        keep &= value > 0
    if not np.isfinite(compute).any() and run.has_column(column):
        raise GLPError(f"run {run.name}: no compute for its rows; add 'params' to its "
                       f"config.json or log '{compute_column}' in {METRICS_FILE}")
    rows = np.flatnonzero(keep)
    return Curve(run.name, compute[rows], value[rows], rows)


def metric_curve(run: Run, metric: str, *, compute_column: str = COMPUTE_6ND,
                 min_activations: float = 0.0, final_only: bool = False) -> Curve:
    """A downstream metric over compute (only the last point with `final_only`)."""
    curve = run_curve(run, metric, compute_column=compute_column, min_activations=min_activations)
    return curve.last() if final_only and len(curve) else curve


def metric_vs_loss(run: Run, loss_curve: Curve, metric_curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """(loss, metric) pairs: the run's loss at each metric point's compute.

    Evaluations are often logged on other steps than the loss, so the loss curve is
    interpolated in log-log space; points outside its compute range are dropped.
    """
    if not len(loss_curve) or not len(metric_curve):
        return np.empty(0), np.empty(0)
    loss = np.exp(_interp_loglog(loss_curve, np.log(metric_curve.compute)))
    ok = np.isfinite(loss)
    return loss[ok], metric_curve.value[ok]


@dataclass(frozen=True)
class FrontierPoint:
    """A logged point that lies on the lower envelope: curve index, run name, row index."""

    curve: int
    name: str
    row: int
    compute: float
    loss: float


@dataclass(frozen=True)
class Switch:
    """Compute at which the envelope passes from one curve to another (-1: no curve)."""

    compute: float
    before: int
    after: int


@dataclass(frozen=True)
class Frontier:
    """Lower envelope of loss over compute, on a log-spaced grid, and the points on it."""

    curves: tuple[Curve, ...]
    final_only: bool
    compute_grid: np.ndarray
    loss_grid: np.ndarray  # NaN where no curve covers the grid point
    curve_grid: np.ndarray  # index of the curve attaining the envelope, -1 where none
    points: tuple[FrontierPoint, ...]
    switches: tuple[Switch, ...]

    def curve_at(self, compute: np.ndarray | float) -> np.ndarray:
        """Index of the compute-efficient curve at each C (-1 outside the envelope)."""
        log_c = np.log(np.atleast_1d(np.asarray(compute, dtype=np.float64)))
        if self.final_only:
            return _pareto_lookup(self.points, log_c)[1]
        return _envelope(self.curves, log_c)[1]


def frontier(curves: Sequence[Curve], *, final_only: bool = False, n_grid: int = 256) -> Frontier:
    """The compute-efficient frontier of a set of loss-vs-compute curves.

    Checkpoint mode (the paper's): each curve is linearly interpolated in log-log space over
    its own compute range; the envelope at C is the minimum over the curves covering C. A
    logged point is on the frontier when no other curve's interpolant lies below it at its C.

    `final_only=True` (one run per budget): each curve contributes its last point only; the
    envelope at C is the lowest loss reached by any point with compute <= C, and a point is
    on the frontier when no other point reaches a lower loss with no more compute.
    """
    # Empty curves stay in place so that indices keep matching the caller's list of runs.
    curves = tuple(c.last() if final_only else c for c in curves)
    if not any(len(c) for c in curves):
        raise GLPError("no points to build a frontier from; check the loss column is logged "
                       "and that rows have activations_seen > min_activations")
    if any((c.compute <= 0).any() or (c.value <= 0).any() for c in curves):
        raise GLPError("frontier needs positive compute and loss (it works in log-log space); "
                       "drop rows with C <= 0 or loss <= 0")
    all_c = np.concatenate([c.compute for c in curves])
    log_grid = np.linspace(np.log(all_c.min()), np.log(all_c.max()), n_grid)
    if final_only:
        points = _pareto_points(curves)
        log_loss, owner = _pareto_lookup(points, log_grid)
        switches = tuple(Switch(b.compute, a.curve, b.curve)
                         for a, b in zip(points, points[1:], strict=False) if a.curve != b.curve)
    else:
        log_loss, owner = _envelope(curves, log_grid)
        points = _envelope_points(curves)
        switches = _envelope_switches(curves, log_grid, owner)
    return Frontier(curves, final_only, np.exp(log_grid), np.exp(log_loss), owner,
                    points, switches)


def _interp_loglog(curve: Curve, log_c: np.ndarray) -> np.ndarray:
    """log loss of `curve` at log C, +inf outside the curve's compute range."""
    out = np.full(log_c.shape, np.inf)
    if not len(curve):
        return out
    x, y = np.log(curve.compute), np.log(curve.value)
    inside = (log_c >= x[0]) & (log_c <= x[-1])
    out[inside] = np.interp(log_c[inside], x, y)
    return out


def _envelope(curves: Sequence[Curve], log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log envelope, owning curve) at each log C; (NaN, -1) where no curve covers it."""
    stack = np.stack([_interp_loglog(c, log_c) for c in curves])
    owner = np.argmin(stack, axis=0)
    log_env = stack[owner, np.arange(len(log_c))]
    covered = np.isfinite(log_env)
    return np.where(covered, log_env, np.nan), np.where(covered, owner, -1)


def _envelope_points(curves: Sequence[Curve]) -> tuple[FrontierPoint, ...]:
    points = []
    for i, curve in enumerate(curves):
        log_c, log_l = np.log(curve.compute), np.log(curve.value)
        others = [_interp_loglog(c, log_c) for j, c in enumerate(curves) if j != i]
        best_other = np.min(others, axis=0) if others else np.full(log_c.shape, np.inf)
        for j in np.flatnonzero(log_l <= best_other + 1e-12):
            points.append(FrontierPoint(i, curve.name, int(curve.rows[j]),
                                        float(curve.compute[j]), float(curve.value[j])))
    return tuple(sorted(points, key=lambda p: (p.compute, p.curve)))


def _envelope_switches(curves: Sequence[Curve], log_grid: np.ndarray,
                       owner: np.ndarray) -> tuple[Switch, ...]:
    """Where the owning curve changes, located by bisection between grid points."""
    switches = []
    for k in np.flatnonzero(owner[:-1] != owner[1:]):
        lo, hi, before = log_grid[k], log_grid[k + 1], owner[k]
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if _envelope(curves, np.array([mid]))[1][0] == before:
                lo = mid
            else:
                hi = mid
        switches.append(Switch(float(np.exp(hi)), int(before), int(owner[k + 1])))
    return tuple(switches)


def _pareto_points(curves: Sequence[Curve]) -> tuple[FrontierPoint, ...]:
    candidates = sorted((float(c.compute[0]), float(c.value[0]), i)
                        for i, c in enumerate(curves) if len(c))
    points, best = [], math.inf
    for compute, loss, i in candidates:
        if loss < best:
            best = loss
            points.append(FrontierPoint(i, curves[i].name, int(curves[i].rows[0]), compute, loss))
    return tuple(points)


def _pareto_lookup(points: Sequence[FrontierPoint],
                   log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log of the best loss at compute <= C, its curve) from Pareto points sorted by C."""
    log_pc = np.log([p.compute for p in points])
    idx = np.searchsorted(log_pc, log_c + 1e-12, side="right") - 1
    valid = idx >= 0
    log_loss = np.where(valid, np.log([p.loss for p in points])[np.maximum(idx, 0)], np.nan)
    owner = np.where(valid, np.array([p.curve for p in points])[np.maximum(idx, 0)], -1)
    return log_loss, owner
