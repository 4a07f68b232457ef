"""Scan vs unrolled blocks: the GLP train step compiled with each `unroll`, timed
interleaved in one process (min and median step, compile seconds).

    .venv/bin/python experiments/bench_unroll.py --d 576 --n-layers 6 --batch 1024 --unroll 1,0
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from glp_jax.config import make_config
from glp_jax.model import GLP, GLPConfig
from glp_jax.train import make_optimizer, make_train_step


def compiled_step(d: int, n_layers: int, batch: int, unroll: int):
    """(one step, compile seconds) at this unroll, on a device-resident batch."""
    graphdef, params = nnx.split(GLP(GLPConfig(d_input=d, n_layers=n_layers), rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(make_config(dict(train_dataset="x", batch_size=batch,
                                            num_steps=1000)), 1000)
    step = jax.jit(make_train_step(graphdef, tx, accum=1, compute_dtype=jnp.float32,
                                   discrete=True, unroll=unroll), donate_argnums=(0, 1))
    x = jax.random.normal(jax.random.key(1), (batch, d))
    key = jax.random.key(2)
    state = [params, tx.init(params)]
    t = time.perf_counter()
    exe = step.lower(state[0], state[1], x, None, jnp.int32(0), key).compile()
    compile_s = time.perf_counter() - t

    def one():
        state[0], state[1], loss, _ = exe(state[0], state[1], x, None, jnp.int32(0), key)
        return loss.block_until_ready()

    one()
    return one, compile_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--unroll", default="1,0", help="comma-separated (0 = all blocks)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    steps = {u: compiled_step(args.d, args.n_layers, args.batch, int(u))
             for u in args.unroll.split(",")}
    times: dict[str, list[float]] = {u: [] for u in steps}
    for _ in range(args.rounds):
        for u, (one, _) in steps.items():
            t = time.perf_counter()
            one()
            times[u].append(time.perf_counter() - t)
    base = min(next(iter(times.values())))
    print(f"| d={args.d} d{args.n_layers}, batch {args.batch} | compile s | step min ms | "
          "median ms | min vs first |")
    print("|---|---|---|---|---|")
    for u, ts in times.items():
        ts.sort()
        print(f"| unroll {u} | {steps[u][1]:.1f} | {ts[0] * 1e3:,.1f} | "
              f"{ts[len(ts) // 2] * 1e3:,.1f} | {ts[0] / base:.3f} |")


if __name__ == "__main__":
    main()
