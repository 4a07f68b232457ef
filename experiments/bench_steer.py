"""Cost of steered generation: plain greedy generation vs the same prompts and batches with
the last-position edit hooked into layer 14 (addition only, + GLP on-manifold projection,
+ SAE reconstruction), split into LLM time and time inside the projection.

Arms run interleaved, `--reps` rounds of (plain, diffmean, glp, sae), so background load on
a shared box hits them alike; each arm's figure is its total over the rounds. Then, with
--demo-cost, the whole `evaluate_steering` at demo size (8 prompts x r in {0.4, 1.2, 2.0} x
diffmean/glp/sae x 20 tokens, incl. the unsteered pass, NLL scoring and VADER) plus the
fixed costs of `steer_run` (fortune texts + VADER, DiffMean over 256 + 256 texts).

The GLP: a trained run given with --run, else random-init weights at the spec's d3 widths
for SmolLM2 (d_model 2d = 1152, d_mlp 4d = 2304, ~36M parameters; the projection's cost
depends on width and depth, not on training). The SAE: --sae RUN, else random-init (8x,
k 32, as experiments/cpu/sae.yaml).

    .venv/bin/python experiments/bench_steer.py [--run DIR] [--sae DIR] [--n-prompts 32]
        [--batch-size 32] [--new-tokens 20] [--threads 1] [--reps 2] [--demo-cost]

--threads sets torch's intra-op threads (default: torch's own); on the shared 2-core box
one thread was ~5x faster than two for these small forwards (two OpenMP threads wait on
each other when another process holds a core).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAYER = 14


def random_glp(d: int, n_layers: int, d_model: int | None, d_mlp: int | None):
    import numpy as np
    from flax import nnx

    from glp_jax.api import LoadedGLP
    from glp_jax.model import GLP, GLPConfig, Normalizer

    cfg = GLPConfig(d_input=d, n_layers=n_layers, d_model=d_model or 2 * d,
                    d_mlp=d_mlp or 4 * d).resolved()
    return LoadedGLP(GLP(cfg, rngs=nnx.Rngs(0)),
                     Normalizer.from_moments(np.zeros(d), np.full(d, 4.0)), cfg, [],
                     "random-init")


def random_sae(d: int):
    import numpy as np
    from flax import nnx

    from glp_jax.model import Normalizer
    from glp_jax.sae import LoadedSAE, SAEConfig, TopKSAE

    cfg = SAEConfig.from_expansion(d, 8, 32).resolved()
    return LoadedSAE(TopKSAE(cfg, rngs=nnx.Rngs(0)).arrays(),
                     Normalizer.from_moments(np.zeros(d), np.full(d, 4.0)), cfg, "random-init")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--d-mlp", type=int, default=None)
    ap.add_argument("--demo-cost", action="store_true")
    args = ap.parse_args()

    import jax
    import torch
    from flax import nnx

    import glp_jax
    from glp_jax.evals.recon import GLPProjection
    from glp_jax.evals.steer import diffmean_direction, evaluate_steering, fit_chunk
    from glp_jax.evals.steer_data import steer_texts
    from glp_jax.llm.extract import tokenize_documents
    from glp_jax.llm.generate import LastPositionEdit, greedy_generate
    from glp_jax.llm.loading import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"[bench] torch {torch.__version__} threads {torch.get_num_threads()}, jax "
          f"{jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    lm = load_causal_lm("smollm2")
    glp = glp_jax.load(args.run) if args.run else random_glp(lm.d, args.n_layers, args.d_model,
                                                             args.d_mlp)
    sae = glp_jax.load(args.sae) if args.sae else random_sae(lm.d)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(glp.model)))
    print(f"[bench] GLP {glp.source}: {glp.config.n_layers} blocks, d_model "
          f"{glp.config.d_model}, d_mlp {glp.config.d_mlp}, {n_params:,} params; SAE "
          f"{sae.source}: {sae.config.n_latents} latents, k {sae.k}")
    t = time.perf_counter()
    texts = steer_texts(n_prompts=args.n_prompts)
    t_texts = time.perf_counter() - t
    t = time.perf_counter()
    w, _ = diffmean_direction(lm, LAYER, texts.pos, texts.neg)
    t_dir = time.perf_counter() - t
    ids = tokenize_documents(lm.tokenizer, texts.prompts, 64)
    alpha = 1.2 * 5.0  # a plausible strength; cost does not depend on it

    arms = {"plain": None, "diffmean": None, "glp": GLPProjection(glp), "sae": sae}
    for rec in arms.values():
        fit_chunk(rec, args.batch_size)  # as steer_run does: one unpadded shape per batch

    def gen(name, prompts):
        if name == "plain":
            return greedy_generate(lm, prompts, max_new_tokens=args.new_tokens,
                                   batch_size=args.batch_size, stop_at_eos=False)
        edit = LastPositionEdit(w, alpha_B=alpha, post=arms[name])
        return greedy_generate(lm, prompts, max_new_tokens=args.new_tokens,
                               batch_size=args.batch_size, layer=LAYER, edit=edit,
                               stop_at_eos=False)

    for name in arms:  # warm-up: compile the projection's row buckets, warm the LLM
        gen(name, ids[: args.batch_size])
        if len(ids) % args.batch_size:
            gen(name, ids[: len(ids) % args.batch_size])
    tot = {n: {"s": 0.0, "post": 0.0, "edit": 0.0, "tok": 0} for n in arms}
    for _ in range(args.reps):
        for name in arms:
            g = gen(name, ids)
            tot[name]["s"] += g.seconds
            tot[name]["post"] += g.post_seconds
            tot[name]["edit"] += g.edit_seconds
            tot[name]["tok"] += g.forward_tokens
    base = tot["plain"]["s"]
    print(f"\n{len(ids)} neutral fortune prompts ({min(map(len, ids))}-{max(map(len, ids))} "
          f"tokens), {args.new_tokens} new tokens each, batch {args.batch_size}, greedy, KV "
          f"cache, {lm.model_id} fp32 layer {LAYER}, {args.reps} interleaved rounds\n")
    print("| arm | tokens/s | ms/token | x plain | LLM s | projection s | edit s |")
    print("|---|---|---|---|---|---|---|")
    for name, x in tot.items():
        llm = x["s"] - x["post"] - x["edit"]
        print(f"| {name} | {x['tok'] / x['s']:.1f} | {1e3 * x['s'] / x['tok']:.1f} | "
              f"{x['s'] / base:.2f} | {llm:.2f} | {x['post']:.2f} | {x['edit']:.3f} |")
    g = tot["glp"]
    print(f"\nGLP projection share of glp-arm time: {100 * g['post'] / g['s']:.1f}% "
          f"({1e3 * g['post'] / (g['tok'] / args.batch_size):.1f} ms per forward of "
          f"{args.batch_size} rows)")
    print(f"fixed costs of steer_run: fortune texts + VADER {t_texts:.1f} s, DiffMean over "
          f"{len(texts.pos)} + {len(texts.neg)} texts {t_dir:.1f} s")

    if args.demo_cost:
        rs, n = (0.4, 1.2, 2.0), 8
        t = time.perf_counter()
        methods = {"diffmean": None, "glp": GLPProjection(glp), "sae": sae}
        for rec in methods.values():
            fit_chunk(rec, args.batch_size)
        r = evaluate_steering(lm, LAYER, w, 5.0, texts.prompts[:n], methods,
                              rs=rs, max_new_tokens=20, batch_size=args.batch_size,
                              progress=False)
        s = time.perf_counter() - t
        tm = r["timing"]
        print(f"\ndemo size: {n} prompts x r {rs} x 3 methods x 20 tokens (+ unsteered): "
              f"{s:.1f} s total = generation {tm['generation_seconds']:.1f} s "
              f"({tm['tokens_per_s']:.0f} tok/s) + NLL {tm['nll_seconds']:.1f} s + VADER/"
              f"stats {s - tm['generation_seconds'] - tm['nll_seconds']:.1f} s; with the fixed "
              f"costs above ~{s + t_texts + t_dir:.0f} s")


if __name__ == "__main__":
    main()
