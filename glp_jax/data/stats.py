"""Float64 running moments with the Chan et al. parallel merge.

A `Moments` holds count, mean and M2 (sum of squared deviations) per dimension, so that
statistics accumulated over many appends equal those of all rows at once, and two partial
results merge exactly (up to float64 rounding) in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    count: int
    mean: np.ndarray  # [..., d] float64
    m2: np.ndarray  # [..., d] float64

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> Moments:
        return Moments(0, np.zeros(shape, np.float64), np.zeros(shape, np.float64))

    @staticmethod
    def of(x_NxD: np.ndarray) -> Moments:
        """Moments of a batch of rows, computed in float64 with the two-pass formula."""
        x = np.asarray(x_NxD, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            return Moments.zeros(x.shape[1:])
        mean = x.mean(axis=0)
        m2 = np.square(x - mean).sum(axis=0)
        return Moments(n, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Chan's pairwise update: exact combination of two disjoint row sets."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def var(self) -> np.ndarray:
        """Population variance (divides by n, like the original's E[x^2]-E[x]^2)."""
        if self.count == 0:
            return np.full_like(self.m2, np.nan)
        return self.m2 / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)
