"""Intervals and paired tests (evals/stats.py) against scipy, brute-force enumeration and
simulated coverage/power."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from glp_jax.evals.stats import paired_test, sign_flip_test, smallest_detectable, t_interval


def test_t_interval_equals_scipy():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.6, 0.9, 8)
    b = a - rng.normal(0.02, 0.03, 8)
    iv = t_interval(a - b)
    ref = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (iv["low"], iv["high"]) == pytest.approx((ref.low, ref.high), rel=1e-12)
    lo, hi = sps.t.interval(0.9, 7, loc=np.mean(a - b), scale=sps.sem(a - b))
    iv90 = t_interval(a - b, confidence=0.9)
    assert (iv90["low"], iv90["high"]) == pytest.approx((lo, hi), rel=1e-12)
    # centred elsewhere, same half-width
    moved = t_interval(a - b, estimate=1.0)
    assert moved["high"] - 1.0 == pytest.approx(iv["high"] - iv["mean"], rel=1e-12)
    assert np.isnan(t_interval([0.3])["low"])
    t = paired_test(a, b)
    assert (t["low"], t["high"]) == (iv["low"], iv["high"])
    assert t["p_t"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)


def _brute_force_p(d):
    obs = abs(np.mean(d))
    flips = [abs(np.mean(np.multiply(s, d))) for s in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= obs - 1e-12 for f in flips) / len(flips)


def test_sign_flip_p_value_equals_brute_force():
    rng = np.random.default_rng(1)
    for n in (1, 4, 7, 10):
        d = rng.normal(0.3, 1.0, n)
        res = sign_flip_test(d)
        assert res["exact"] and res["p"] == _brute_force_p(d) and res["min_p"] == 2 / 2 ** n
    ties = np.array([1.0, -1.0, 2.0, 2.0, -2.0, 1.0])  # many equal |means|
    assert sign_flip_test(ties)["p"] == _brute_force_p(ties)
    assert sign_flip_test(np.full(8, 0.1))["p"] == 2 / 256  # all one sign: the floor
    # beyond 16 pairs: seeded random flips, close to the exact value
    d = rng.normal(0.25, 1.0, 17)
    signs = 1.0 - 2.0 * ((np.arange(2 ** 17)[:, None] >> np.arange(17)) & 1)
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    mc = sign_flip_test(d, seed=0)
    assert not mc["exact"] and abs(mc["p"] - exact) < 0.01
    assert mc == sign_flip_test(d, seed=0)


def test_paired_t_interval_covers_at_its_nominal_rate():
    rng = np.random.default_rng(2)
    trials, n, mu = 4000, 8, 0.03
    task = rng.uniform(0.6, 0.9, (trials, n))  # task difficulty, shared by both methods
    a = task + mu + rng.normal(0, 0.04, (trials, n))
    b = task + rng.normal(0, 0.04, (trials, n))
    cover = np.mean([(iv := t_interval(a[i] - b[i]))["low"] <= mu <= iv["high"]
                     for i in range(trials)])
    assert 0.94 <= cover <= 0.96  # binomial sd 0.0034 around 0.95


def test_smallest_detectable_difference_has_the_stated_power():
    n, sd = 8, 0.05
    delta = smallest_detectable(sd, n)
    # about (t_{0.975} + t_{0.8}) sd / sqrt(n) with 7 degrees of freedom
    approx = (sps.t.ppf(0.975, n - 1) + sps.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
    assert delta == pytest.approx(approx, rel=0.05)
    d = np.random.default_rng(3).normal(delta, sd, (20_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
    power = np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.8, abs=0.012)
    # two tasks (one degree of freedom): finite, and far larger
    assert np.isfinite(smallest_detectable(sd, 2)) and smallest_detectable(sd, 2) > 5 * delta
    res = paired_test(np.zeros(n) + delta, np.zeros(n))
    assert res["detectable"] == 0.0 and res["p_perm"] == 2 / 256
