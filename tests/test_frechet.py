"""Frechet distance against scipy's general matrix square root."""

import numpy as np
from scipy import linalg

from glp_jax.evals.frechet import (
    frechet,
    frechet_distance,
    frechet_distance_gaussians,
    frechet_gaussians,
    gaussian_fit,
)


def test_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 12)) @ rng.standard_normal((12, 12)) + 1.0
    y = rng.standard_normal((2000, 12)) @ rng.standard_normal((12, 12))
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert abs(frechet_distance(x, y) - ref) < 1e-8 * max(1.0, ref)
    assert abs(frechet_distance(x, x)) < 1e-8


def _fd_closed(mu1, l1, mu2, l2):
    """FD of Gaussians with commuting (here diagonal in one basis) covariances."""
    return np.sum((mu1 - mu2) ** 2) + np.sum(l1) + np.sum(l2) - 2 * np.sum(np.sqrt(l1 * l2))


def test_closed_form_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a shared eigenbasis: S1 S2 = S2 S1
    l1, l2 = rng.uniform(0.1, 5, d), rng.uniform(0.01, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    res = frechet_gaussians(mu1, s1, mu2, s2)
    want = _fd_closed(mu1, l1, mu2, l2)
    assert abs(res.fd - want) < 1e-10 * want
    assert res.method == "eigh" and res.agree and res.scipy_accurate
    assert res.imag_rel < 1e-8 and res.residual_rel < 1e-10
    # Diagonal covariances, straight from the formula.
    assert abs(frechet_distance_gaussians(mu1, np.diag(l1), mu2, np.diag(l2)) - want) < 1e-10 * want


def test_one_dimensional():
    # FD of N(m1, v1), N(m2, v2) = (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2
    res = frechet_gaussians(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert abs(res.fd - (4.0 + (2.0 - 0.5) ** 2)) < 1e-12


def test_agrees_with_scipy_on_random_noncommuting_covariances():
    rng = np.random.default_rng(2)
    for d in (3, 20, 64):
        a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T / d
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        res = frechet_gaussians(mu1, s1, mu2, s2)
        ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
        assert abs(res.fd - ref) < 1e-8 * max(1.0, abs(ref))
        assert res.agree and res.check_rel_diff < 1e-9


def test_zero_on_itself_and_symmetric():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 10)) @ rng.standard_normal((10, 10))
    y = rng.standard_normal((400, 10)) * 2 + 0.5
    assert abs(frechet_distance(x, x)) < 1e-9
    assert abs(frechet_distance(x, y) - frechet_distance(y, x)) < 1e-9 * frechet_distance(x, y)
    assert frechet_distance(x, y) > 0


def test_rank_deficient_is_finite_and_nonnegative():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 32))  # n < d: a rank-7 covariance
    y = rng.standard_normal((5, 32)) + 0.01
    res = frechet(x, y)
    assert np.isfinite(res.fd) and res.fd >= 0 and res.method == "eigh"
    assert res.tr_sqrt >= 0
    # the scipy check runs and reports (its accuracy flag may be false on singular input)
    assert res.imag_rel is not None and res.residual_rel is not None
    assert frechet(x, x).fd < 1e-9


def test_gaussian_fit_matches_numpy_in_chunks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 7)).astype(np.float32) * 3 + 100
    mu, cov = gaussian_fit(x, chunk=64)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
