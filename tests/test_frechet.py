"""Frechet distance against scipy's general matrix square root."""

import numpy as np
from scipy import linalg

from glp_jax.evals.frechet import frechet_distance


def test_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 12)) + 1.0
    y = rng.standard_normal((2000, 12)) @ rng.standard_normal((12, 12))
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert abs(frechet_distance(x, y) - ref) < 1e-8 * max(1.0, ref)
    assert abs(frechet_distance(x, x)) < 1e-8
