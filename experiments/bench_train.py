"""Training throughput vs the machine's matmul peak, measured side by side in one process.

    (a) peak: a plain jnp.dot of two 4096x4096 fp32 matrices (GFLOP/s);
    (b) step: the jitted GLP train step (AdamW, clipping) on a device-resident batch;
    (c) loop: the same step fed by the grain pipeline from a real store (if given), i.e.
        what `glp train` achieves.
FLOPs per activation count the exact matmuls of forward + backward (3x forward).

    .venv/bin/python experiments/bench_train.py [--store runs/demo/acts_train] [--n-layers 3]
        [--shuffle block]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from benchlib import matmul_peak, matmul_times, roofline, timed
from flax import nnx

from glp_jax.config import make_config
from glp_jax.model import GLP, GLPConfig, matmul_flops_per_example, param_count
from glp_jax.train import make_optimizer, make_train_step, scan_unroll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--store", default=None)
    ap.add_argument("--shuffle", default="exact", choices=["exact", "block"],
                    help="the pipeline's shuffle for the fed loop")
    ap.add_argument("--threads", type=int, default=4, help="read threads (TrainConfig default)")
    ap.add_argument("--decompose", action="store_true", help="also time the forward, the "
                    "forward+backward and the optimizer update alone (where the step's time goes)")
    args = ap.parse_args()

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    peak, n = matmul_peak(dtype)  # in the step's compute dtype

    gcfg = GLPConfig(d_input=args.d, n_layers=args.n_layers).resolved()
    model = GLP(gcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg = make_config(dict(train_dataset="x", batch_size=args.batch, num_steps=1000))
    tx, _ = make_optimizer(cfg, 1000)
    opt = tx.init(params)
    step = jax.jit(make_train_step(graphdef, tx, accum=1, compute_dtype=dtype, discrete=True,
                                   unroll=scan_unroll(cfg, args.n_layers)),
                   donate_argnums=(0, 1))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.d), jnp.float32)
    key = jax.random.key(2)
    state = {"p": params, "o": opt}

    def one():
        state["p"], state["o"], loss, _ = step(state["p"], state["o"], x, None, jnp.int32(0), key)
        return loss

    t_step = timed(one, args.steps)
    if args.decompose:
        _decompose(graphdef, state["p"], tx, x, key, dtype, args.steps)
    roof = roofline(gcfg, args.batch) if not args.bf16 else None
    big = matmul_times(4096, 4096, 4096)
    flops_act = 3 * matmul_flops_per_example(gcfg)
    rate = args.batch / t_step
    rows = [(f"jnp.dot {n}^3 {jnp.dtype(dtype).name} (peak)", None, peak)]
    rows.append((f"train step d{args.n_layers} ({'bf16' if args.bf16 else 'fp32'})", rate,
                 rate * flops_act))
    if args.store:
        from glp_jax.data.pipeline import PipelineConfig, build_pipeline  # grain: only here

        pipe = build_pipeline(PipelineConfig(store=args.store, batch_size=args.batch, mode="repeat",
                                             num_threads=args.threads, prefetch=args.threads,
                                             shuffle_mode=args.shuffle))
        it = pipe.make_iterator()

        def fed():
            b = next(it)
            state["p"], state["o"], loss, _ = step(state["p"], state["o"], jnp.asarray(b["x"]),
                                                   None, jnp.int32(0), key)
            return loss

        t_loop = timed(fed, args.steps)
        r = args.batch / t_loop
        rows.append((f"step fed by the grain pipeline ({args.shuffle} shuffle)", r, r * flops_act))
    print(f"GLP d_input={args.d} widths {gcfg.width}/{gcfg.mlp_width}, {args.n_layers} blocks, "
          f"{param_count(gcfg):,} params, batch {args.batch}, {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}")
    print("4096^3 fp32 matmul GFLOP/s: " + ", ".join(
        f"{lib} {2 * 4096**3 / t / 1e9:.1f}" for lib, t in big.items()))
    if roof:
        print(f"roofline at the step's own matmul shapes ({roof['flops'] / 1e9:.1f} GFLOP per "
              f"step): best of numpy/torch/jnp.dot per shape {roof['best_s'] * 1e3:.1f} ms = "
              f"{roof['flops'] / roof['best_s'] / 1e9:.1f} GFLOP/s; each alone: " + ", ".join(
                  f"{lib} {s * 1e3:.1f} ms" for lib, s in roof["per_library_s"].items()))
        print(f"step {t_step * 1e3:.1f} ms: {roof['best_s'] / t_step:.3f} of the roofline "
              f"(matmuls alone at the best library's speed)")
    print("| what | activations/s | GFLOP/s | vs jnp.dot peak |")
    print("|---|---|---|---|")
    for name, r, fl in rows:
        print(f"| {name} | {'' if r is None else f'{r:,.0f}'} | {fl / 1e9:,.1f} | {fl / peak:.2f} |")
    if args.store:
        print(f"\nfed / device-resident batch: {rows[-1][1] / rows[1][1]:.3f}")


def _decompose(graphdef, params, tx, x, key, dtype, reps: int) -> None:
    """Forward, forward+backward and optimizer update, each jitted and timed alone."""
    from glp_jax.train import glp_loss

    loss = glp_loss(graphdef, compute_dtype=dtype, discrete=True)
    fwd = jax.jit(lambda p: loss(p, x, None, key, None)[0])
    grad = jax.jit(jax.value_and_grad(lambda p: loss(p, x, None, key, None)[0]))
    grads = grad(params)[1]
    upd = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    opt = tx.init(params)
    print(f"alone: forward {timed(lambda: fwd(params), reps) * 1e3:.1f} ms, forward+backward "
          f"{timed(lambda: grad(params), reps) * 1e3:.1f} ms, optimizer update + apply "
          f"{timed(lambda: upd(grads, opt, params), reps) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
