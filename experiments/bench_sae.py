"""SAE training throughput vs the machine's matmul peak, measured side by side in one process.

    (a) peak: a plain jnp.dot of two 4096x4096 matrices, fp32 (bf16 with --bf16) (GFLOP/s);
    (b) step: the jitted TopK SAE train step (the trainer's make_step: MSE loss, AdamW,
        clipping, decoder renormalisation, dead-latent counter) on a device-resident batch;
    (c) top-k: jax.lax.top_k + scatter on the [batch, width] pre-activations alone (forward),
        the part of the step that is not a matmul;
    (d) loop: the same step fed by the grain pipeline from a real store (if given).
FLOPs per activation count the exact matmuls, encoder + dense decoder (4 d W forward),
forward + backward = 3x forward.

    .venv/bin/python experiments/bench_sae.py [--d 576] [--expansion 16] [--k 32]
        [--batch 4096] [--store runs/demo/acts_train]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from benchlib import matmul_peak, timed
from flax import nnx

from glp_jax import sae
from glp_jax.config import make_config
from glp_jax.sae import SAEConfig, TopKSAE
from glp_jax.train import SAESpec, make_optimizer, make_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--store", default=None)
    args = ap.parse_args()

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32  # the peak in the step's matmul dtype
    peak, n = matmul_peak(dtype)

    scfg = SAEConfig.from_expansion(args.d, args.expansion, args.k)
    W = scfg.n_latents
    spec = SAESpec(scfg)
    graphdef, params = nnx.split(TopKSAE(scfg, rngs=nnx.Rngs(0)))
    cfg = make_config(dict(train_dataset="x", model="sae", batch_size=args.batch,
                           num_steps=1000, use_bf16=args.bf16, weight_decay=0.0))
    tx, _ = make_optimizer(cfg, 1000)
    step = jax.jit(make_step(spec.loss(graphdef, cfg), tx, accum=1,
                             post_update=spec.post_update(graphdef)), donate_argnums=(0, 1, 2))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.d), jnp.float32)
    key = jax.random.key(2)
    state = {"p": params, "o": tx.init(params), "s": spec.init_stats()}

    def one(xb=x):
        state["p"], state["o"], state["s"], loss, _, _ = step(state["p"], state["o"], state["s"],
                                                              xb, None, jnp.int32(0), key)
        return loss

    t_step = timed(one, args.steps)
    flops_act = 3 * sae.matmul_flops_per_example(scfg)
    rate = args.batch / t_step
    rows = [(f"jnp.dot {n}^3 {jnp.dtype(dtype).name} (peak)", None, None, peak)]
    rows.append((f"SAE train step ({'bf16' if args.bf16 else 'fp32'})", t_step, rate,
                 rate * flops_act))
    pre = jax.nn.relu(jax.random.normal(jax.random.key(3), (args.batch, W), jnp.float32))
    topk = jax.jit(lambda p: sae.topk(p, args.k))
    t_topk = timed(lambda: topk(pre), args.steps)
    rows.append(("top-k + scatter alone (fwd)", t_topk, args.batch / t_topk, None))
    if args.store:
        from glp_jax.data.pipeline import PipelineConfig, build_pipeline

        pipe = build_pipeline(PipelineConfig(store=args.store, batch_size=args.batch,
                                             mode="repeat", num_threads=2, prefetch=2))
        it = pipe.make_iterator()
        t_loop = timed(lambda: one(jnp.asarray(next(it)["x"])), args.steps)
        r = args.batch / t_loop
        rows.append(("step fed by the grain pipeline", t_loop, r, r * flops_act))
    print(f"TopK SAE d_input={args.d} width {W} ({args.expansion}x) k={args.k}, "
          f"{sae.param_count(scfg):,} params, batch {args.batch}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"{flops_act / 1e6:.1f} MFLOP per activation (3 x 4dW)")
    print("| what | ms | activations/s | GFLOP/s | vs jnp.dot peak |")
    print("|---|---|---|---|---|")
    for name, t, r, fl in rows:
        print(f"| {name} | {'' if t is None else f'{t * 1e3:,.1f}'} | "
              f"{'' if r is None else f'{r:,.0f}'} | {'' if fl is None else f'{fl / 1e9:,.1f}'} | "
              f"{'' if fl is None else f'{fl / peak:.2f}'} |")


if __name__ == "__main__":
    main()
