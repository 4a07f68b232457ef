"""One sweep's runs read from disk: each run folder's config and its metrics.jsonl rows.

A run is any folder holding metrics.jsonl; its identity (depth, width, size, seed, budget) comes
from whichever config files it has, under any of a few common key names.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.rundir import METRICS_FILE, as_float, read_metrics
from glp_jax.scaling.formatting import format_count

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
        return np.array([as_float(row.get(key)) for row in self.rows], dtype=np.float64)

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
    rows = read_metrics(run_dir / METRICS_FILE)
    params = as_float(_find_key(config, _CONFIG_ALIASES["params"]))
    if not np.isfinite(params):
        logged = [as_float(row.get("params")) for row in rows]
        params = next((p for p in logged if np.isfinite(p)), math.nan)
    return Run(
        name=name or run_dir.name,
        path=run_dir,
        params=float(params) if np.isfinite(params) else None,
        n_layers=_as_int(_find_key(config, _CONFIG_ALIASES["n_layers"])),
        d_model=_as_int(_find_key(config, _CONFIG_ALIASES["d_model"])),
        seed=_as_int(_find_key(config, _CONFIG_ALIASES["seed"])),
        num_activations=_none_if_nan(as_float(_find_key(config, _CONFIG_ALIASES["num_activations"]))),
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
                from glp_jax.yamlio import safe_load

                loaded = safe_load(path.read_text())
        except Exception as e:  # noqa: BLE001 - any parse failure means the same thing
            raise GLPError(f"cannot parse {path}: {e}; fix the file or delete it") from e
        if isinstance(loaded, dict):
            merged.update(loaded)
    return merged


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


def _as_int(value: Any) -> int | None:
    f = as_float(value)
    return int(f) if np.isfinite(f) else None


def _none_if_nan(value: float) -> float | None:
    return value if np.isfinite(value) else None


def _none_last(value: float | None) -> float:
    return math.inf if value is None else value


def default_loss_column(runs: Sequence[Run]) -> str:
    """`val_loss` when every run logs it, else the training `loss`.

    The training loss is averaged over its log window, so it describes the model a little
    before the logged activations_seen; held-out loss has no such lag and no train noise.
    """
    return "val_loss" if runs and all(r.has_column("val_loss") for r in runs) else "loss"


def metric_columns(runs: Sequence[Run]) -> list[str]:
    """Numeric logged columns that look like downstream metrics (not training bookkeeping)."""
    names = set()
    for run in runs:
        for row in run.rows:
            names.update(k for k, v in row.items() if np.isfinite(as_float(v)))
    return sorted(n for n in names if n not in _BOOKKEEPING_COLUMNS
                  and not n.endswith(_BOOKKEEPING_SUFFIXES))
