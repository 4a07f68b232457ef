"""Confidence intervals shared by the evaluations (probing, steering)."""

from __future__ import annotations

import math

import numpy as np


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
