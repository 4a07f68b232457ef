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


def linear_shapes(gcfg) -> list[tuple[int, int, int]]:
    """(in, out, count) of every Linear a GLP applies per example (model.matmul_flops...)."""
    d, D, H, L = gcfg.d_input, gcfg.width, gcfg.mlp_width, gcfg.n_layers
    n_embed = 2 if gcfg.is_multi_layer else 1
    return [(d, D, 1), (D, d, 1), (D, D, 2 * n_embed), (D, H, 3 * L), (H, D, L)]


def step_matmuls(gcfg, batch: int) -> dict[tuple[int, int, int], int]:
    """{(m, k, n): count} of a train step: each Linear's forward, input and weight grads."""
    out: dict[tuple[int, int, int], int] = {}
    for i, o, c in linear_shapes(gcfg):
        for shape in ((batch, i, o), (batch, o, i), (i, batch, o)):
            out[shape] = out.get(shape, 0) + c
    return out


def _time_min(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_times(m: int, k: int, n: int, reps: int = 3) -> dict[str, float]:
    """Seconds of one fp32 [m, k] @ [k, n] in numpy, torch (all threads) and jnp.dot."""
    import os

    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    return {"numpy": _time_min(lambda: a @ b, reps),
            "torch": _time_min(lambda: torch.mm(ta, tb), reps),
            "jnp.dot": _time_min(lambda: dot(ja, jb).block_until_ready(), reps)}


def roofline(gcfg, batch: int, reps: int = 3) -> dict:
    """The machine's best matmul time for the step's own matmuls: per shape the fastest of
    numpy, torch and jnp.dot, summed over the step; also each library alone."""
    per_lib = {"numpy": 0.0, "torch": 0.0, "jnp.dot": 0.0}
    best = 0.0
    flops = 0
    for (m, k, n), count in step_matmuls(gcfg, batch).items():
        t = matmul_times(m, k, n, reps)
        for lib, s in t.items():
            per_lib[lib] += count * s
        best += count * min(t.values())
        flops += count * 2 * m * k * n
    return {"best_s": best, "per_library_s": per_lib, "flops": flops}


def glp_train_step(d: int, n_layers: int, batch: int, dtype=jnp.float32):
    """(one, step, args, gcfg): the jitted GLP train step (AdamW, clipping, donated state) on
    a device-resident batch, as `glp train` compiles it; one() runs a step and returns its
    loss; step(*args()) is the call to lower."""
    from flax import nnx

    from glp_jax.config import make_config
    from glp_jax.model import GLP, GLPConfig
    from glp_jax.train import make_optimizer, make_train_step, scan_unroll

    gcfg = GLPConfig(d_input=d, n_layers=n_layers).resolved()
    graphdef, params = nnx.split(GLP(gcfg, rngs=nnx.Rngs(0)))
    cfg = make_config(dict(train_dataset="x", batch_size=batch, num_steps=1000))
    tx, _ = make_optimizer(cfg, 1000)
    step = jax.jit(make_train_step(graphdef, tx, accum=1, compute_dtype=dtype, discrete=True,
                                   unroll=scan_unroll(cfg, n_layers)), donate_argnums=(0, 1))
    x = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
    key = jax.random.key(2)
    state = {"p": params, "o": tx.init(params)}

    def args():
        return state["p"], state["o"], x, None, jnp.int32(0), key

    def one():
        state["p"], state["o"], loss, _ = step(*args())
        return loss

    return one, step, args, gcfg
