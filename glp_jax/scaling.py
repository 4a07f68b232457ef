"""Scaling-law fits for GLP sweeps: load runs, find the compute-efficient frontier, fit laws.

Compute is C = 6·N·D (N = all GLP parameters, D = activations seen), as in the paper. The
paper's method takes the intermediate checkpoints of one cosine run per depth as the data
axis and fits L(C) = E + A·C^-alpha on the lower envelope of those curves. Intermediate
checkpoints are not compute-optimal for their budget (the learning rate has not annealed
yet), so every fit here records exactly which points it used. One-run-per-budget sweeps use
`final_only=True` instead: only each run's last point counts.

Everything is numpy/scipy and pure, apart from `load_runs` (reads files).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from glp_jax.errors import GLPError

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
    threadpool_limits = None

METRICS_FILE = "metrics.jsonl"
CONFIG_FILES = ("config.json", "run.json", "config.yaml", "config.yml")
COMPUTE_6ND = "compute_6nd"

# Config keys are looked up under these names, at any nesting depth (first match wins).
_CONFIG_ALIASES = {
    "n_layers": ("n_layers", "num_layers", "depth"),
    "d_model": ("d_model",),
    "params": ("params", "n_params", "num_params"),
    "seed": ("seed",),
    "num_activations": ("num_activations", "total_activations"),
}

# Logged columns that describe training itself, never a downstream metric to fit.
_BOOKKEEPING_COLUMNS = frozenset({
    "step", "activations_seen", "loss", "val_loss", "train_loss", "eval_loss", "params", COMPUTE_6ND, "flops_exact",
    "lr", "learning_rate", "lr_factor", "grad_norm", "update_norm", "param_norm", "epoch",
    "time", "wall_time", "elapsed", "elapsed_s", "seed", "n_layers", "d_model", "batch_size",
    "devices", "mfu",
})
_BOOKKEEPING_SUFFIXES = ("_per_s", "_per_sec", "_s", "_time", "_seconds")


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Run:
    """One training run of a sweep: its identity and its logged rows, merged by step."""

    name: str
    path: Path
    params: float | None
    n_layers: int | None
    d_model: int | None
    seed: int | None
    num_activations: float | None
    rows: tuple[dict, ...]

    def column(self, key: str) -> np.ndarray:
        """One logged column as float64, NaN on rows that lack it or hold a non-number."""
        return np.array([_as_float(row.get(key)) for row in self.rows], dtype=np.float64)

    def has_column(self, key: str) -> bool:
        return bool(np.isfinite(self.column(key)).any())

    def compute(self, compute_column: str = COMPUTE_6ND) -> np.ndarray:
        """C per row: the logged column, else (for 6ND only) 6 * params * activations_seen."""
        logged = self.column(compute_column)
        if compute_column != COMPUTE_6ND:
            return logged
        params = self.params if self.params is not None else np.nan
        derived = 6.0 * params * self.column("activations_seen")
        return np.where(np.isfinite(logged), logged, derived)

    @property
    def label(self) -> str:
        """Short legend label: depth and size when known, else the run name."""
        parts = []
        if self.n_layers is not None:
            parts.append(f"d{self.n_layers}")
        if self.params is not None:
            parts.append(format_count(self.params))
        return " · ".join(parts) if parts else self.name


def load_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run under `sweep_dir` (any folder holding metrics.jsonl), smallest model first."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise GLPError(f"sweep directory {root} does not exist; pass the folder that holds "
                       f"one sub-folder per run (each with {METRICS_FILE})")
    files = sorted(root.rglob(METRICS_FILE))
    if not files:
        raise GLPError(f"no runs found under {root}: expected <run>/{METRICS_FILE} files; "
                       "point at the sweep folder, or check the runs have logged anything")
    runs = []
    for file in files:
        run = load_run(file.parent, name=_run_name(file.parent, root))
        if not run.rows:
            warnings.warn(f"skipping {file}: it holds no rows with a 'step' yet", stacklevel=2)
            continue
        runs.append(run)
    if not runs:
        raise GLPError(f"no run under {root} has logged a row yet; wait for the first log "
                       "lines or point at a finished sweep")
    return sorted(runs, key=lambda r: (_none_last(r.params), _none_last(r.n_layers), r.name))


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """One run folder: metrics.jsonl plus whatever config files it has."""
    run_dir = Path(run_dir)
    config = _read_configs(run_dir)
    rows = _read_metrics(run_dir / METRICS_FILE)
    params = _as_float(_find_key(config, _CONFIG_ALIASES["params"]))
    if not np.isfinite(params):
        logged = [_as_float(row.get("params")) for row in rows]
        params = next((p for p in logged if np.isfinite(p)), math.nan)
    return Run(
        name=name or run_dir.name,
        path=run_dir,
        params=float(params) if np.isfinite(params) else None,
        n_layers=_as_int(_find_key(config, _CONFIG_ALIASES["n_layers"])),
        d_model=_as_int(_find_key(config, _CONFIG_ALIASES["d_model"])),
        seed=_as_int(_find_key(config, _CONFIG_ALIASES["seed"])),
        num_activations=_none_if_nan(_as_float(_find_key(config, _CONFIG_ALIASES["num_activations"]))),
        rows=tuple(rows),
    )


def _run_name(run_dir: Path, root: Path) -> str:
    rel = run_dir.relative_to(root)
    return root.name if rel == Path(".") else rel.as_posix()


def _read_configs(run_dir: Path) -> dict:
    """All config files of a run merged (later files in CONFIG_FILES win)."""
    merged: dict = {}
    for fname in CONFIG_FILES:
        path = run_dir / fname
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                loaded = json.loads(path.read_text())
            else:
                import yaml

                loaded = yaml.safe_load(path.read_text())
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing
            raise GLPError(f"cannot parse {path}: {e}; fix the file or delete it") from e
        if isinstance(loaded, dict):
            merged.update(loaded)
    return merged


def _read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl merged by step (a later line for the same step adds or wins).

    A resumed run may log a step twice; the later value wins. A killed writer may leave a
    partial last line, which is skipped; a bad line elsewhere is an error.
    """
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_step: dict[float, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise GLPError(f"{path}:{i + 1} is not valid JSON ({e}); repair or delete "
                           "that line") from e
        if not isinstance(obj, dict) or not np.isfinite(_as_float(obj.get("step"))):
            continue
        by_step.setdefault(float(obj["step"]), {}).update(obj)
    return [by_step[s] for s in sorted(by_step)]


def _find_key(config: Mapping, names: Sequence[str]) -> Any:
    """First value under any of `names`, searching the top level first, then nested dicts."""
    queue = [config]
    while queue:
        node = queue.pop(0)
        for name in names:
            if name in node and not isinstance(node[name], Mapping):
                return node[name]
        queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return int(f) if np.isfinite(f) else None


def _none_if_nan(value: float) -> float | None:
    return value if np.isfinite(value) else None


def _none_last(value: float | None) -> float:
    return math.inf if value is None else value


# ----------------------------------------------------------------------------- curves


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


def default_loss_column(runs: Sequence[Run]) -> str:
    """`val_loss` when every run logs it, else the training `loss`.

    The training loss is averaged over its log window, so it describes the model a little
    before the logged activations_seen; held-out loss has no such lag and no train noise.
    """
    return "val_loss" if runs and all(r.has_column("val_loss") for r in runs) else "loss"


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


# ----------------------------------------------------------------------------- frontier


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


# ----------------------------------------------------------------------------- fits


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


def _fit_dict(fit, *, x: np.ndarray, y: np.ndarray, names: tuple[str, str]) -> dict:
    """Coefficients, intervals and the fitted points (x, y; what they are in x_name/y_name)."""
    out = {"law": fit.law, "formula": fit.formula(), **fit.coefficients,
           "intervals": {k: list(v) for k, v in fit.intervals.items()},
           "confidence": fit.confidence, "n_boot": fit.n_boot, "n_points": len(x),
           "x_name": names[0], "y_name": names[1], "x": x.tolist(), "y": y.tolist()}
    if hasattr(fit, "huber_delta"):
        out["huber_delta"] = fit.huber_delta
    return out


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


# ----------------------------------------------------------------------------- sweeps


def metric_columns(runs: Sequence[Run]) -> list[str]:
    """Numeric logged columns that look like downstream metrics (not training bookkeeping)."""
    names = set()
    for run in runs:
        for row in run.rows:
            names.update(k for k, v in row.items() if np.isfinite(_as_float(v)))
    return sorted(n for n in names if n not in _BOOKKEEPING_COLUMNS
                  and not n.endswith(_BOOKKEEPING_SUFFIXES))


def fit_runs(runs: Sequence[Run], *, loss_column: str | None = None,
             compute_column: str = COMPUTE_6ND, final_only: bool = False,
             min_activations: float = 0.0, metrics: Sequence[str] | None = None,
             metric_points: str = "loss_frontier", n_boot: int = 1000, seed: int = 0,
             huber_delta: float = 1e-3, n_grid: int = 256) -> dict:
    """Frontier, loss law and downstream fits of a sweep, as a JSON-able dict.

    Downstream vs compute uses, by default, the metric points logged by whichever run is
    compute-efficient (on the loss frontier) at that compute (`metric_points="all"` uses
    every point). Downstream vs loss pairs each metric point with its run's loss at the same
    compute (log-log interpolation, never extrapolated).
    """
    if not runs:
        raise GLPError("no runs to fit; load a sweep with load_runs(sweep_dir) first")
    if metric_points not in ("loss_frontier", "all"):
        raise GLPError(f"metric_points={metric_points!r}; use 'loss_frontier' or 'all'")
    loss_column = loss_column or default_loss_column(runs)
    curves = [run_curve(r, loss_column, compute_column=compute_column,
                        min_activations=min_activations, positive=True) for r in runs]
    if not any(len(c) for c in curves):
        raise GLPError(f"no run logs a positive '{loss_column}' with activations_seen > "
                       f"{min_activations}; pass loss_column= one of the logged columns")
    env = frontier(curves, final_only=final_only, n_grid=n_grid)
    used = list(env.points)
    loss_fit = fit_power_law([p.compute for p in used], [p.loss for p in used],
                             huber_delta=huber_delta, n_boot=n_boot, seed=seed)
    result = {
        "method": ("final points, one run per budget" if final_only
                   else "lower envelope of intermediate checkpoints (paper)"),
        "final_only": final_only,
        "loss_column": loss_column,
        "compute_column": compute_column,
        "min_activations": min_activations,
        "n_points_logged": int(sum(len(c) for c in curves)),
        "note": ("fits use only the frontier points listed; intermediate checkpoints of a cosine "
                 "run are not compute-optimal for their budget" if not final_only else
                 "fits use only the frontier points listed (final point of each run)"),
        "runs": [_run_summary(r, c) for r, c in zip(runs, curves, strict=True)],
        "frontier": {
            "points": [_point_summary(runs, curves, p) for p in used],
            "switches": [{"compute": s.compute,
                          "before": runs[s.before].name if s.before >= 0 else None,
                          "after": runs[s.after].name if s.after >= 0 else None}
                         for s in env.switches],
        },
        "loss_fit": loss_fit.to_dict(),
        "downstream": {},
    }
    for metric in metrics if metrics is not None else metric_columns(runs):
        result["downstream"][metric] = _fit_metric(
            runs, curves, env, metric, compute_column=compute_column,
            min_activations=min_activations, final_only=final_only, metric_points=metric_points,
            n_boot=n_boot, seed=seed, huber_delta=huber_delta)
    return _jsonable(result)


def fit_sweep(sweep_dir: str | Path, **kwargs) -> dict:
    """`fit_runs(load_runs(sweep_dir), **kwargs)`, recording the folder."""
    return {"sweep_dir": str(sweep_dir), **fit_runs(load_runs(sweep_dir), **kwargs)}


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


def metric_curve(run: Run, metric: str, *, compute_column: str = COMPUTE_6ND,
                 min_activations: float = 0.0, final_only: bool = False) -> Curve:
    """A downstream metric over compute (only the last point with `final_only`)."""
    curve = run_curve(run, metric, compute_column=compute_column, min_activations=min_activations)
    return curve.last() if final_only and len(curve) else curve


def _fit_metric(runs, loss_curves, env: Frontier, metric: str, *, compute_column, min_activations,
                final_only, metric_points, n_boot, seed, huber_delta) -> dict:
    x_c, y_c, x_l, y_l = [], [], [], []
    for i, run in enumerate(runs):
        curve = metric_curve(run, metric, compute_column=compute_column,
                             min_activations=min_activations, final_only=final_only)
        if not len(curve):
            continue
        take = (env.curve_at(curve.compute) == i if metric_points == "loss_frontier"
                else np.ones(len(curve), bool))
        x_c.extend(curve.compute[take])
        y_c.extend(curve.value[take])
        loss, value = metric_vs_loss(run, loss_curves[i], curve)
        x_l.extend(loss)
        y_l.extend(value)
    out: dict = {}
    try:
        fit = fit_downstream_vs_compute(x_c, y_c, huber_delta=huber_delta, n_boot=n_boot,
                                        seed=seed)
        out["vs_compute"] = fit.to_dict() | {"formula": fit.formula(y=metric)}
    except GLPError as e:
        out["vs_compute"] = {"skipped": str(e), "n_points": len(x_c)}
    try:
        fit = fit_linear_vs_loss(x_l, y_l, n_boot=n_boot, seed=seed)
        out["vs_loss"] = fit.to_dict() | {"formula": fit.formula(y=metric)}
    except GLPError as e:
        out["vs_loss"] = {"skipped": str(e), "n_points": len(x_l)}
    return out


def _run_summary(run: Run, curve: Curve) -> dict:
    seen = run.column("activations_seen")
    seen = seen[np.isfinite(seen)]
    return {
        "name": run.name, "label": run.label, "n_layers": run.n_layers, "d_model": run.d_model,
        "params": run.params, "seed": run.seed, "num_activations": run.num_activations,
        "final_activations": float(seen.max()) if len(seen) else None,
        "final_compute": float(curve.compute[-1]) if len(curve) else None,
        "final_loss": float(curve.value[-1]) if len(curve) else None,
        "n_points": len(curve),
    }


def _point_summary(runs: Sequence[Run], curves: Sequence[Curve], point: FrontierPoint) -> dict:
    row = runs[point.curve].rows[point.row]
    return {"run": point.name, "step": _as_float(row.get("step")),
            "activations_seen": _as_float(row.get("activations_seen")),
            "compute": point.compute, "loss": point.loss}


def _jsonable(value: Any) -> Any:
    """Plain Python containers and numbers; NaN/Inf become None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------- reporting


def format_number(value: float) -> str:
    """Compact number: 0.52, 435.1, 0.169, 3.92e6."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3g}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_count(value: float | None) -> str:
    """Parameter counts as 35.9M / 1.66B."""
    if value is None:
        return "?"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _interval_text(fit: dict, name: str) -> str:
    interval = fit.get("intervals", {}).get(name)
    return "—" if not interval else f"[{format_number(interval[0])}, {format_number(interval[1])}]"


def results_markdown(result: dict) -> str:
    """A Markdown summary of `fit_runs`/`fit_sweep` output: runs, loss law, downstream fits."""
    loss_fit = result["loss_fit"]
    lines = [
        f"## Scaling: `{result['loss_column']}` vs compute C = 6·N·D",
        "",
        f"Method: {result['method']}. {loss_fit['n_points']} of {result['n_points_logged']} "
        f"logged points lie on the frontier and were fitted ({result['note']}).",
        "",
        "| run | depth | params | final compute (FLOPs) | final loss |",
        "|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        compute = run["final_compute"]
        loss = run["final_loss"]
        lines.append(
            f"| {run['name']} | {run['n_layers'] if run['n_layers'] is not None else '?'} "
            f"| {format_count(run['params'])} "
            f"| {format_number(compute) if compute is not None else '—'} "
            f"| {format_number(loss) if loss is not None else '—'} |")
    confidence = round(100 * loss_fit["confidence"])
    lines += ["", f"**Loss law:** {loss_fit['formula']}", "",
              f"| coefficient | estimate | {confidence}% CI |", "|---|---|---|"]
    for name in ("E", "A", "alpha"):
        lines.append(f"| {name} | {format_number(loss_fit[name])} | {_interval_text(loss_fit, name)} |")
    if result.get("downstream"):
        lines += ["", "| metric | fit | formula | n points | intervals |", "|---|---|---|---|---|"]
        for metric, fits in result["downstream"].items():
            for kind, label in (("vs_compute", "vs compute"), ("vs_loss", "vs loss")):
                fit = fits[kind]
                if "skipped" in fit:
                    lines.append(f"| {metric} | {label} | skipped: {fit['skipped']} "
                                 f"| {fit['n_points']} | — |")
                    continue
                names = [k for k in fit.get("intervals", {})]
                ci = "; ".join(f"{k} {_interval_text(fit, k)}" for k in names) or "—"
                lines.append(f"| {metric} | {label} | {fit['formula']} | {fit['n_points']} | {ci} |")
    return "\n".join(lines) + "\n"
