"""Timing helpers shared by the benchmark scripts (run as `python experiments/bench_*.py`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def timed(fn, reps: int) -> float:
    """Seconds per call of fn (one warm-up call; waits for the device at both ends)."""
    out = fn()
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def matmul_peak(dtype, n: int | None = None, reps: int = 5) -> tuple[float, int]:
    """(FLOP/s of a plain n x n x n jnp.dot in `dtype`, n): the roofline a step is held to.
    n defaults to 4096 on CPU and 8192 on accelerators (large enough to saturate them)."""
    n = n or (4096 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timed(lambda: dot(a), reps), n
