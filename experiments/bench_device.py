"""Device suite: bf16 MFU of the paper's GLP shapes at the paper's batch, with the memory
plan of the same compile beside it. Run on a GPU/TPU host (`make bench-device`):

    .venv/bin/python experiments/bench_device.py [--shapes 2048x3,2048x6,2048x12,2048x24,4096x6]
        [--batch 4096] [--steps 10] [--peak-flops 989e12]

For every shape d x L: the real train step (AdamW, clipping, bf16 compute, fp32 params,
buffer donation) compiled for all local devices (data parallel), its memory analysis (what
XLA assigns on this device: parameters, optimizer, temporaries), then `--steps` timed steps
on a device-resident batch. MFU = exact matmul FLOPs of forward + backward (3 x forward) per
second / (peak bf16 FLOP/s per device x devices). A shape that does not fit is retried with
gradient accumulation 2, 4, ... (reported). `--shrink K` divides the widths for a smoke run
on CPU (the figures then mean nothing).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from glp_jax.config import make_config
from glp_jax.model import GLPConfig, matmul_flops_per_example, param_count
from glp_jax.sharding import global_batch, make_mesh, tree_shardings
from glp_jax.train import GLPSpec, compile_step, init_params, jit_train_step, make_optimizer

# dense bf16 peak per device (vendor figures), matched against jax's device_kind
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12,
             "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_for(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def run_shape(d: int, n_layers: int, batch: int, steps: int, shrink: int, mesh) -> dict:
    gcfg = GLPConfig(d_input=max(8, d // shrink), n_layers=n_layers,
                     d_model=max(8, 2 * d // shrink), d_mlp=max(8, 4 * d // shrink)).resolved()
    limit = device_bytes()
    accum = 1
    while True:
        cfg = make_config(dict(train_dataset="x", batch_size=batch, num_steps=1000,
                               use_bf16=True, gradient_accumulation_steps=accum))
        plan = compile_step(cfg, gcfg, mesh)
        total = plan["argument_bytes"] + plan["output_bytes"] - plan["alias_bytes"] + plan["temp_bytes"]
        if limit is None or total <= 0.95 * limit or batch // accum // mesh.size <= 1:
            break
        accum *= 2
    spec = GLPSpec(gcfg)
    with jax.set_mesh(mesh):
        graphdef, params, p_shard = init_params(spec, 0, mesh)
        tx, _ = make_optimizer(cfg, 1000)
        abs_opt = jax.eval_shape(tx.init, params)
        o_shard = tree_shardings(abs_opt, mesh)
        opt = jax.jit(tx.init, out_shardings=o_shard)(params)
        step = jit_train_step(cfg, spec, graphdef, tx, p_shard, o_shard, None, mesh)
        x = global_batch(np.random.default_rng(0).standard_normal(
            (batch // jax.process_count(), gcfg.d_input), np.float32), mesh)
        key = jax.random.key(0)
        stats = None
        params, opt, stats, loss, _, _ = step(params, opt, stats, x, None, jnp.int32(0), key)
        jax.block_until_ready(loss)
        t = time.perf_counter()
        for i in range(steps):
            params, opt, stats, loss, _, _ = step(params, opt, stats, x, None, jnp.int32(i), key)
        jax.block_until_ready(loss)
        dt = (time.perf_counter() - t) / steps
    flops = 3 * matmul_flops_per_example(gcfg) * batch
    return {"shape": f"d{d} x {n_layers}", "params": param_count(gcfg), "accum": accum,
            "step_s": dt, "flops_per_s": flops / dt, "activations_per_s": batch / dt,
            "total_gib": total / 2**30, "temp_gib": plan["temp_bytes"] / 2**30,
            "param_gib": plan["param_bytes"] / 2**30, "opt_gib": plan["opt_bytes"] / 2**30,
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x3,2048x6,2048x12,2048x24,4096x6")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-flops", type=float, default=None, help="per device, bf16")
    ap.add_argument("--shrink", type=int, default=1, help="width divisor (CPU smoke runs)")
    args = ap.parse_args()
    mesh = make_mesh(-1, 1)
    kind = jax.devices()[0].device_kind
    peak = args.peak_flops or peak_for(kind)
    limit = device_bytes()
    print(f"# device suite: {jax.device_count()} x {kind} ({'peak bf16 ' + f'{peak / 1e12:.3g} TFLOP/s' if peak else 'peak unknown: pass --peak-flops'}"
          f"{f', {limit / 2**30:.1f} GiB usable' if limit else ''}), batch {args.batch}, "
          f"{args.steps} steps{f', widths / {args.shrink}' if args.shrink > 1 else ''}")
    print("| shape | params | accum | step ms | activations/s | TFLOP/s | MFU | params GiB | "
          "optimizer GiB | temporaries GiB | total GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for item in args.shapes.split(","):
        d, n_layers = (int(v) for v in item.split("x"))
        r = run_shape(d, n_layers, args.batch, args.steps, args.shrink, mesh)
        mfu = r["flops_per_s"] / (peak * jax.device_count()) if peak else float("nan")
        print(f"| {r['shape']} | {r['params'] / 1e6:,.0f}M | {r['accum']} | {r['step_s'] * 1e3:,.1f} | "
              f"{r['activations_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.2f} | {mfu:.3f} | "
              f"{r['param_gib']:.2f} | {r['opt_gib']:.2f} | {r['temp_gib']:.2f} | "
              f"{r['total_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
