"""Reconstructions of raw activations: the common currency of FD, delta LM loss and recon.

A reconstructor maps raw (denormalised) activations [N, d] to raw activations [N, d]. The
evaluations never care which method is behind it: the GLP's on-manifold projection, an SAE,
PCA, or the reference ablations (identity, zero, mean). Every reconstructor is a plain
callable on float32 numpy arrays with a `name` and a `describe()` for reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from glp_jax.chunks import map_rows


class Reconstructor(Protocol):
    name: str

    def __call__(self, acts_NxD: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...


def describe_method(rec) -> dict:
    """A reconstructor's describe(), or its name for plain callables."""
    describe = getattr(rec, "describe", None)
    return describe() if callable(describe) else {"method": getattr(rec, "name", repr(rec))}


@dataclass
class Identity:
    """acts -> acts: the control whose delta LM loss must be exactly 0."""

    name: str = "identity"

    def __call__(self, acts_NxD):
        return np.asarray(acts_NxD, np.float32)

    def describe(self) -> dict:
        return {"method": self.name}


@dataclass
class ZeroAblation:
    name: str = "zero-ablation"

    def __call__(self, acts_NxD):
        return np.zeros_like(np.asarray(acts_NxD, np.float32))

    def describe(self) -> dict:
        return {"method": self.name}


@dataclass
class MeanAblation:
    """Every position replaced by the per-dimension mean (of the training store)."""

    mean_D: np.ndarray
    name: str = "mean-ablation"

    def __call__(self, acts_NxD):
        acts = np.asarray(acts_NxD, np.float32)
        return np.broadcast_to(np.asarray(self.mean_D, np.float32), acts.shape).copy()

    def describe(self) -> dict:
        return {"method": self.name}


@dataclass
class GLPProjection:
    """The GLP's on-manifold projection (noise to sigma0, Euler-integrate back to 0).

    Inputs are processed in chunks of `batch_size` rows, the last one zero-padded, so one
    compiled shape serves every call. Each call draws fresh noise (the original does too),
    reproducibly: call i uses seed + i.
    """

    glp: object  # glp_jax.api.LoadedGLP
    sigma0: float = 0.5
    steps: int = 20
    convention: str = "code"  # code (sigma0 0.474, 10 Euler steps) | paper (0.5, 19 steps)
    seed: int = 0
    batch_size: int = 4096
    layer: int | None = None  # LLM layer, for multi-layer GLPs
    name: str = "glp"
    calls: int = field(default=0, init=False)

    def __call__(self, acts_NxD):
        def project(chunk, _i):
            seed = self.seed + self.calls
            self.calls += 1
            return self.glp.project(chunk, seed=seed, layer=self.layer,
                                    convention=self.convention, sigma0=self.sigma0,
                                    steps=self.steps)

        acts = np.asarray(acts_NxD, np.float32)
        return map_rows(project, acts, acts.shape[1], self.batch_size)

    def describe(self) -> dict:
        return {"method": self.name, "source": getattr(self.glp, "source", None),
                "step": getattr(self.glp, "step", None), "sigma0": self.sigma0,
                "steps": self.steps, "convention": self.convention}


def load_reconstructor(path, *, pca_k: int = 32, sigma0: float = 0.5, steps: int = 20,
                       convention: str = "code", seed: int = 0) -> Reconstructor:
    """The reconstructor stored at `path`: a PCA folder (pca.npz, top `pca_k` components),
    an SAE run, or a GLP run / original-format folder (on-manifold projection)."""
    from pathlib import Path

    from glp_jax.pca import PCA, PCA_NPZ, PCAReconstruction

    if (Path(path) / PCA_NPZ).is_file():
        return PCAReconstruction(PCA.load(path), pca_k)
    from glp_jax.api import LoadedGLP, load

    loaded = load(path)
    if isinstance(loaded, LoadedGLP):
        return GLPProjection(loaded, sigma0=sigma0, steps=steps, convention=convention,
                             seed=seed)
    return loaded  # an SAE: already a Reconstructor
