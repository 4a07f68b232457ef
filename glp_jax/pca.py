"""PCA baseline: the linear reconstruction a GLP and an SAE are compared against.

Fitted in float64 on an activation store, streamed in row blocks (sum of x and of x x^T),
so any store size fits in memory of O(d^2). The full eigendecomposition is kept, so the
number of components k is chosen when reconstructing, not when fitting.

A PCA folder holds `pca.npz` (mean, eigenvalues, components) and `pca.json` (where it
came from); `PCAReconstruction(PCA.load(dir), k)` is a `Reconstructor`.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.progress import progress_bar
from glp_jax.rundir import write_atomic

PCA_NPZ, PCA_JSON = "pca.npz", "pca.json"


@dataclass
class PCA:
    mean_D: np.ndarray  # float64
    eigenvalues_D: np.ndarray  # float64, descending (population covariance)
    components_DxD: np.ndarray  # float64, column i = i-th principal direction
    info: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.mean_D.shape[0])

    def explained_variance_ratio(self, k: int) -> float:
        ev = np.clip(self.eigenvalues_D, 0, None)
        return float(ev[:k].sum() / ev.sum())

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean_D, eigenvalues=self.eigenvalues_D,
                 components=self.components_DxD)
        write_atomic(out / PCA_NPZ, buf.getvalue())
        write_atomic(out / PCA_JSON, json.dumps(self.info, indent=1))
        return out

    @staticmethod
    def load(path) -> PCA:
        path = Path(path)
        if not (path / PCA_NPZ).is_file():
            raise GLPError(f"{path} holds no {PCA_NPZ}; fit one with `glp pca STORE --out {path}`")
        z = np.load(path / PCA_NPZ)
        info = json.loads((path / PCA_JSON).read_text()) if (path / PCA_JSON).exists() else {}
        return PCA(z["mean"], z["eigenvalues"], z["components"], info)


def pca_from_moments(n: int, sum_D: np.ndarray, outer_DxD: np.ndarray, info: dict) -> PCA:
    """PCA from streamed sums: cov = E[x x^T] - mu mu^T (float64), eigenvalues descending."""
    mean = sum_D / n
    cov = outer_DxD / n - np.outer(mean, mean)
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(w)[::-1]
    return PCA(mean, w[order], v[:, order], info)


def fit_pca(store, layer: int | None = None, max_rows: int | None = None,
            block_rows: int = 32768, progress: bool = True) -> PCA:
    """Fit on the first `max_rows` rows (all by default) of `store`, one block at a time.

    Sums are taken about a shift (the first block's mean), so float64 cancellation in
    E[x x^T] - mu mu^T stays small even for activations with a large mean."""
    n = len(store) if max_rows is None else min(int(max_rows), len(store))
    if n < 2:
        raise GLPError(f"store {store.url} holds {len(store)} rows; PCA needs at least 2")
    d = store.d
    shift = None
    s = np.zeros(d, np.float64)
    ss = np.zeros((d, d), np.float64)
    t0 = time.perf_counter()
    with progress_bar(n, "pca", "row", enabled=progress) as bar:
        for start in range(0, n, block_rows):
            x = np.asarray(store.read_range(start, min(n, start + block_rows), layer=layer),
                           np.float64)
            if not np.isfinite(x).all():
                raise GLPError(f"store {store.url} rows {start}..{start + len(x)} hold NaN/Inf; "
                               f"re-extract them")
            if shift is None:
                shift = x.mean(0)
            x -= shift
            s += x.sum(0)
            ss += x.T @ x
            bar.update(len(x))
    info = {"store": str(store.url), "layer": layer if layer is not None else store.layers[0],
            "rows": n, "d": d, "model": store.meta.model, "seconds": time.perf_counter() - t0}
    pca = pca_from_moments(n, s, ss, info)
    pca.mean_D = pca.mean_D + shift
    return pca


@dataclass
class PCAReconstruction:
    """x -> mean + P_k (x - mean): projection onto the top-k principal directions."""

    pca: PCA
    k: int
    name: str = ""

    def __post_init__(self):
        if not 1 <= self.k <= self.pca.d:
            raise GLPError(f"PCA k={self.k} must be in 1..{self.pca.d}")
        self.name = self.name or f"pca-k{self.k}"
        self._v = self.pca.components_DxD[:, : self.k].astype(np.float32)
        self._mu = self.pca.mean_D.astype(np.float32)

    def __call__(self, acts_NxD):
        x = np.asarray(acts_NxD, np.float32) - self._mu
        return (x @ self._v) @ self._v.T + self._mu

    def describe(self) -> dict:
        return {"method": self.name, "k": self.k, "store": self.pca.info.get("store"),
                "explained_variance_ratio": self.pca.explained_variance_ratio(self.k)}
