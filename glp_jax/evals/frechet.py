"""Frechet distance between Gaussian fits of two activation sets (float64, raw space).

FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2). tr sqrt(S1 S2) is computed as the
sum of square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD), which is
stabler than a general matrix square root.
"""

from __future__ import annotations

import numpy as np


def gaussian_fit(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x_NxD, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_gaussians(mu1, s1, mu2, s2) -> float:
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance(x_NxD: np.ndarray, y_MxD: np.ndarray) -> float:
    if x_NxD.shape[1] != y_MxD.shape[1]:
        raise ValueError(f"widths differ: {x_NxD.shape[1]} vs {y_MxD.shape[1]}")
    return frechet_distance_gaussians(*gaussian_fit(x_NxD), *gaussian_fit(y_MxD))
