"""Frechet distance against scipy's general matrix square root; the bias-corrected FD_inf
against closed-form Gaussian FDs, a brute-force extrapolation and hand-paired replicates."""

import numpy as np
import pytest
from scipy import linalg, stats
from threadpoolctl import threadpool_limits

from glp_jax.evals.frechet import (
    FRACTIONS,
    X_STREAM,
    Y_STREAM,
    fd_estimate,
    fd_estimates,
    frechet,
    frechet_distance,
    frechet_distance_gaussians,
    frechet_gaussians,
    gaussian_fit,
    paired_difference,
    replicate_groups,
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


# ---------------------------------------------------------------- bias-corrected FD_inf
def _gaussian_pair(d, eps, seed=0):
    """Two Gaussians a small step apart (the regime where the raw FD's ~b/n bias is large
    against the FD itself) and their FD in closed form (scipy sqrtm of the true S1 S2)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a1 = q * np.sqrt(np.exp(rng.uniform(-2, 2, d)))
    a2 = (np.eye(d) + eps * rng.standard_normal((d, d))) @ a1
    mu2 = eps * rng.standard_normal(d)
    s1, s2 = a1 @ a1.T, a2 @ a2.T
    truth = mu2 @ mu2 + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    return a1, a2, mu2, truth


@pytest.mark.parametrize("d,n,eps", [(8, 400, 0.1), (16, 300, 0.1)])
def test_fd_inf_interval_holds_its_estimate_and_covers_the_closed_form(d, n, eps):
    a1, a2, mu2, truth = _gaussian_pair(d, eps)
    rng = np.random.default_rng(1)
    trials, covered, est, raw = 100, 0, [], []
    with threadpool_limits(1):  # tiny matrices: BLAS threads only contend
        for t in range(trials):
            x = rng.standard_normal((n, d)) @ a1.T
            y = rng.standard_normal((n, d)) @ a2.T + mu2
            e = fd_estimate(x, y, seed=t)
            assert e.low <= e.fd_inf <= e.high  # every trial
            covered += e.low <= truth <= e.high
            est.append(e.fd_inf)
            raw.append(e.fd_raw)
    assert covered >= 0.9 * trials
    se = np.std(est) / np.sqrt(trials)
    assert abs(np.mean(est) - truth) < 3 * se  # unbiased at this precision
    assert np.mean(raw) - truth > 5 * se  # while the raw FD is not


def _fd_scipy(x, y):
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_fd_inf_equals_a_brute_force_extrapolation():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((203, 5)) @ rng.standard_normal((5, 5)) + 0.3
    y = rng.standard_normal((181, 5)) * 1.5
    R, seed = 4, 7
    e = fd_estimate(x, y, replicates=R, seed=seed)
    gx = replicate_groups(len(x), R, seed, X_STREAM)
    gy = replicate_groups(len(y), R, seed, Y_STREAM)
    assert sorted(np.concatenate(gy).tolist()) == list(range(len(y)))  # a partition
    assert {len(g) for g in gx} == {50, 51}

    def line(groups_x, groups_y):
        """FD of the union of every group's first round(f m) rows, fitted in 1/f."""
        fds, inv = [], []
        for f in FRACTIONS:
            ix = np.concatenate([g[:round(f * len(g))] for g in groups_x])
            iy = np.concatenate([g[:round(f * len(g))] for g in groups_y])
            fds.append(_fd_scipy(x[ix], y[iy]))
            nx, ny = sum(map(len, groups_x)), sum(map(len, groups_y))
            inv.append(0.5 * (nx / len(ix) + ny / len(iy)))
        slope, intercept = np.polyfit(inv, fds, 1)
        return intercept, slope, fds

    a, b, fds = line(gx, gy)
    assert e.fd_inf == pytest.approx(a, rel=1e-9) and e.bias == pytest.approx(b, rel=1e-8)
    np.testing.assert_allclose(e.curve, fds, rtol=1e-9)
    assert e.fd_raw == pytest.approx(frechet_distance(x, y), rel=1e-10)
    reps = [line([gx[r]], [gy[r]])[0] for r in range(R)]
    np.testing.assert_allclose(e.replicates, reps, rtol=1e-8)
    half = stats.t.ppf(0.975, R - 1) * np.std(reps, ddof=1) / np.sqrt(R)
    assert (e.low, e.high) == pytest.approx((a - half, a + half), rel=1e-8)
    assert e.replicate_rows == [[len(gx[r]), len(gy[r])] for r in range(R)]
    with pytest.raises(ValueError, match="fewer replicates"):
        fd_estimate(x[:9], y, replicates=4)


def test_paired_differences_share_the_reference_groups():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((500, 6))
    xa = rng.standard_normal((400, 6)) * 1.2
    est = fd_estimates({"a": xa, "b": xa + 0.05, "far": xa + 0.5, "same": xa.copy()}, y,
                       seed=1)
    d = paired_difference(est["b"], est["a"].to_dict())  # estimates or their JSON
    by_hand = np.subtract(est["b"].replicates, est["a"].replicates)
    half = stats.t.ppf(0.975, 4) * by_hand.std(ddof=1) / np.sqrt(5)
    centre = est["b"].fd_inf - est["a"].fd_inf
    assert (d["estimate"], d["low"], d["high"]) == pytest.approx((centre, centre - half,
                                                                  centre + half), rel=1e-10)
    assert d["raw"] == pytest.approx(est["b"].fd_raw - est["a"].fd_raw)
    # replicate r of both methods used the same reference rows: the reference noise cancels,
    # so the paired interval is far narrower than the unpaired one would be
    assert d["se"] < 0.2 * np.hypot(est["a"].se, est["b"].se)
    far = paired_difference(est["far"], est["a"])
    assert far["low"] > 0 and far["estimate"] == pytest.approx(6 * 0.25, rel=0.3)
    same = paired_difference(est["same"], est["a"])
    assert same["estimate"] == 0 and same["high"] - same["low"] == 0
    other = fd_estimate(xa, y[:499], seed=1)
    with pytest.raises(ValueError, match="not paired"):
        paired_difference(other, est["a"])
