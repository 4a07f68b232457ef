"""FD sampling throughput vs the model's own forward-pass rate at the same batch.

    (a) forward: one jitted bare `model(z, sigma)` at global batch B (params as arguments,
        one sigma for the batch as in sampling), timed over repeated calls:
        forward rows/s = B / time per call;
    (b) sampler: `evals.sampling.sample_activations` (sharded, padded, host transfer
        included, compilation excluded): rows x Euler steps per second.
The ratio (b)/(a) is the sampler's efficiency; the bar is >= 0.8. Random-init weights
(throughput does not depend on them). Prints figures, asserts nothing.

    .venv/bin/python experiments/bench_fd.py [--d 576] [--n-layers 3] [--batch 1024]
        [--steps 10] [--batches 2] [--rounds 3] [--bf16]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax.api import LoadedGLP
from glp_jax.evals.sampling import sample_activations
from glp_jax.model import GLP, GLPConfig, Normalizer, matmul_flops_per_example, param_count
from glp_jax.sharding import batch_sharding, make_mesh, tree_shardings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=2, help="sampler batches (n = batches x B)")
    ap.add_argument("--reps", type=int, default=10, help="timed forward calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--per-row-sigma", action="store_true",
                    help="time the forward with a [B] sigma (training's shape) instead of one")
    ap.add_argument("--bf16", action="store_true", help="bf16 matmuls (fp32 otherwise)")
    args = ap.parse_args()

    dtype = jnp.bfloat16 if args.bf16 else None
    cfg = GLPConfig(d_input=args.d, n_layers=args.n_layers).resolved()
    model = GLP(cfg, rngs=nnx.Rngs(0))
    glp = LoadedGLP(model, Normalizer.from_moments(np.zeros(args.d), np.ones(args.d)), cfg,
                    [], "random-init", None)
    mesh = make_mesh(-1, 1)
    B = args.batch
    flops = matmul_flops_per_example(cfg)
    print(f"devices: {jax.devices()}")
    print(f"model d={args.d} n_layers={args.n_layers} params={param_count(cfg):,} "
          f"batch={B} dtype={'bf16' if args.bf16 else 'fp32'}")

    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, tree_shardings(params, mesh))
        z = jax.device_put(jax.random.normal(jax.random.key(0), (B, args.d)), batch_sharding(mesh))
        # One sigma for the whole batch, as in sampling (XLA may then compute the time
        # embedding and time_proj once per batch); --per-row-sigma: one per row, as training.
        sigma = (jax.device_put(jnp.full((B,), 0.5, jnp.float32), batch_sharding(mesh, 1))
                 if args.per_row_sigma else jnp.float32(0.5))

        @jax.jit
        def forward(params, z, sigma):
            return nnx.merge(graphdef, params)(z, sigma, compute_dtype=dtype)

        jax.block_until_ready(forward(params, z, sigma))

        def time_forward():
            t = time.perf_counter()
            for _ in range(args.reps):
                out = forward(params, z, sigma)
            jax.block_until_ready(out)
            return (time.perf_counter() - t) / args.reps

    n = args.batches * B

    def run_sampler():
        return sample_activations(glp, n, args.steps, batch_size=B, mesh=mesh, progress=False,
                                  compute_dtype=dtype)[1]

    run_sampler()  # compile outside the timing
    # Interleave the two measurements and keep each one's best round: on a shared machine
    # this compares like with like.
    per_call, st = float("inf"), None
    for r in range(args.rounds):
        pc, s = time_forward(), run_sampler()
        print(f"round {r}: forward {B / pc:,.0f} rows/s, sampler {s['forward_passes_per_s']:,.0f}"
              f" rows x steps/s")
        per_call = min(per_call, pc)
        st = s if st is None or s["wall_s"] < st["wall_s"] else st
    fwd_rows = B / per_call
    print(f"forward: {per_call * 1e3:.2f} ms per call, {1 / per_call:,.1f} forward passes/s, "
          f"{fwd_rows:,.0f} rows/s, {fwd_rows * flops / 1e9:,.1f} GFLOP/s")
    rows_steps = st["forward_passes_per_s"]
    print(f"sampler: n={n} steps={args.steps}: {st['samples_per_s']:,.1f} samples/s, "
          f"{rows_steps / B:,.1f} batch-steps/s, {rows_steps:,.0f} rows x steps/s, "
          f"{rows_steps * flops / 1e9:,.1f} GFLOP/s (compile {st['compile_s']:.1f}s)")
    print(f"ratio sampler/forward: {rows_steps / fwd_rows:.3f} (bar: >= 0.8)")
    print(f"implied at 1000 steps: {rows_steps / 1000:,.1f} samples/s; 50k samples in "
          f"{50_000 * 1000 / rows_steps / 60:,.1f} min")


if __name__ == "__main__":
    main()
