"""Intervals and paired tests shared by the evaluations (FD replicates, probing, steering).

- `bootstrap_ci`: percentile bootstrap of a mean (many items: prompts, documents).
- `t_interval`: Student-t interval of a mean of independent values, optionally centred on
  another estimate of the same quantity (FD's random-group intervals, evals/frechet.py).
- `paired_test`: for few paired items (8-16 probing tasks), where a percentile bootstrap of
  the mean under-covers (it draws from only n distinct values and ignores the t
  distribution's heavier tails): the paired t-interval and t-test, an exact sign-flip
  permutation test, and what the design could detect at all (`smallest_detectable`).
"""

from __future__ import annotations

import math

import numpy as np

EXACT_MAX_N = 16  # enumerate all 2^n sign flips up to here (65,536 x 16); Monte Carlo above
N_FLIPS_MC = 100_000  # random sign flips beyond EXACT_MAX_N


def bootstrap_ci(values, *, seed: int = 0, confidence: float = 0.95,
                 n_resamples: int = 9999) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (scipy.stats.bootstrap, rng seeded, so the
    interval is reproducible; the original's was not). Empty: (nan, nan); one value or a
    constant sample: (value, value)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def t_interval(values, *, estimate: float | None = None, confidence: float = 0.95) -> dict:
    """Student-t interval from n independent, identically distributed values.

    Centred on their mean by default; `estimate` centres it on another estimate of the same
    quantity whose standard error is sd/sqrt(n) or less (the random-group method: the
    full-sample estimate beside n disjoint replicates of it). Returns {estimate, low, high,
    se, df, n, mean, confidence}; fewer than two values give nan bounds."""
    from scipy.stats import t as student_t

    x = np.asarray(values, np.float64).ravel()
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    est = mean if estimate is None else float(estimate)
    if n < 2:
        return {"estimate": est, "low": math.nan, "high": math.nan, "se": math.nan,
                "df": max(n - 1, 0), "n": n, "mean": mean, "confidence": confidence}
    se = float(x.std(ddof=1) / math.sqrt(n))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * se
    return {"estimate": est, "low": est - half, "high": est + half, "se": se, "df": n - 1,
            "n": n, "mean": mean, "confidence": confidence}


def sign_flip_test(diffs, *, seed: int = 0, n_flips: int = N_FLIPS_MC) -> dict:
    """Two-sided sign-flip permutation test of mean(diffs) = 0 (paired differences
    symmetric about 0 under the null). Exact for n <= EXACT_MAX_N: every one of the 2^n
    sign vectors, p = #{|mean of flipped| >= |observed|} / 2^n, the observed one included.
    Larger n: `n_flips` seeded random flips, p = (1 + #) / (1 + n_flips).
    `min_p`: the smallest p the test can return with these n (2 / 2^n when exact: the
    observed signs and their negation always tie), so with n <= 5 no difference is ever
    significant at 0.05."""
    d = np.asarray(diffs, np.float64).ravel()
    n = int(d.size)
    if n == 0:
        return {"p": math.nan, "exact": True, "n": 0, "n_flips": 0, "min_p": math.nan}
    obs = abs(d.mean())
    tol = 1e-12 * max(float(np.abs(d).max()), 1e-300)  # float ties count as ties
    if n <= EXACT_MAX_N:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = 1.0 - 2.0 * bits  # every sign vector once
        stat = np.abs(signs @ d) / n
        count = int((stat >= obs - tol).sum())
        return {"p": count / len(signs), "exact": True, "n": n, "n_flips": int(len(signs)),
                "min_p": 2.0 / len(signs)}
    rng = np.random.default_rng(seed)
    count = 0
    for a in range(0, n_flips, 4096):
        signs = rng.choice((1.0, -1.0), size=(min(4096, n_flips - a), n))
        count += int((np.abs(signs @ d) / n >= obs - tol).sum())
    return {"p": (1 + count) / (1 + n_flips), "exact": False, "n": n, "n_flips": int(n_flips),
            "min_p": 1.0 / (1 + n_flips)}


def smallest_detectable(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The mean paired difference a two-sided paired t-test at `alpha` detects with
    probability `power`, given the sd of the differences and n pairs: solves
    P(|T| > t_{1-alpha/2, n-1}) = power for T ~ noncentral t(n-1, delta sqrt(n) / sd).
    (about (t_{1-alpha/2} + t_power) sd / sqrt(n); 2.9 sd / sqrt(n) for large n.)"""
    from scipy.optimize import brentq
    from scipy.stats import nct
    from scipy.stats import t as student_t

    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    crit = float(student_t.ppf(1 - alpha / 2, df))

    def gap(nc):  # the lower tail is negligible here; scipy returns nan for some tiny ones
        lower = float(np.nan_to_num(nct.cdf(-crit, df, nc), nan=0.0))
        return float(nct.sf(crit, df, nc)) + lower - power

    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
    return float(brentq(gap, 0.0, hi, xtol=1e-10) * sd / math.sqrt(n))


def paired_test(a, b, *, confidence: float = 0.95, alpha: float = 0.05,
                power: float = 0.8, seed: int = 0) -> dict:
    """Paired comparison of a and b over the same items (a_i - b_i): the t-interval of the
    mean difference and the paired t-test (scipy.stats.ttest_rel), the sign-flip
    permutation p-value, and the smallest difference detectable at `alpha` with `power`.
    Returns {mean, low, high, se, df, n, sd, t, p_t, p_perm, perm_exact, min_p_perm,
    detectable, alpha, power, confidence}."""
    from scipy.stats import ttest_rel

    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired_test needs equally many values, got {x.size} and {y.size}")
    d = x - y
    n = int(d.size)
    iv = t_interval(d, confidence=confidence)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    if n >= 2 and sd > 0:
        tt = ttest_rel(x, y)
        t_stat, p_t = float(tt.statistic), float(tt.pvalue)
    else:  # constant differences: no spread to test against
        t_stat = math.nan
        p_t = (1.0 if d.size and d[0] == 0 else 0.0) if n >= 2 else math.nan
    perm = sign_flip_test(d, seed=seed)
    return {"mean": iv["mean"], "low": iv["low"], "high": iv["high"], "se": iv["se"],
            "df": iv["df"], "n": n, "sd": sd, "t": t_stat, "p_t": p_t, "p_perm": perm["p"],
            "perm_exact": perm["exact"], "min_p_perm": perm["min_p"],
            "detectable": smallest_detectable(sd, n, alpha=alpha, power=power),
            "alpha": alpha, "power": power, "confidence": confidence}
