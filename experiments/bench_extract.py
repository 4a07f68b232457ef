"""Extraction throughput vs its baselines, measured side by side in one process.

    (a) bare: the truncated forward alone (embeddings + decoder layers 0..k) on the same
        padded batches, nothing else;
    (b) extract: the whole path (tokenize, pack, truncated forward, gather rows, append to a
        real on-disk store with commit);
    (c) naive: the full model with output_hidden_states=True, then hidden_states[k+1].
Windows alternate between the three so background load hits them alike. Prints tokens/s
(non-padding tokens pushed through the LLM) and the ratios.

    .venv/bin/python experiments/bench_extract.py [--windows 8] [--window-docs 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from glp_jax.config import ExtractConfig
from glp_jax.data.corpus import fortune_corpus
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.llm.extract import Extractor, TruncatedForward, pack_batches, tokenize_documents
from glp_jax.llm.loading import load_causal_lm


def padded_batches(lm, docs, max_length, batch_tokens):
    ids = tokenize_documents(lm.tokenizer, [d.text for d in docs], max_length)
    out = []
    for batch in pack_batches([len(t) for t in ids], batch_tokens):
        width = max(len(ids[j]) for j in batch)
        inp = np.zeros((len(batch), width), np.int64)
        mask = np.zeros_like(inp)
        for r, j in enumerate(batch):
            inp[r, : len(ids[j])], mask[r, : len(ids[j])] = ids[j], 1
        out.append((torch.from_numpy(inp), torch.from_numpy(mask)))
    return out, sum(len(t) for t in ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-docs", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_causal_lm("smollm2")
    cfg = ExtractConfig(batch_tokens=args.batch_tokens).for_model(lm.n_layers)
    layer = cfg.layers[0]
    docs = fortune_corpus().split("train", seed=42)[: args.windows * args.window_docs]
    windows = [docs[i: i + args.window_docs] for i in range(0, len(docs), args.window_docs)]
    bare = TruncatedForward(lm.model, [layer])
    ex = Extractor(lm, cfg)
    tmp = tempfile.mkdtemp()
    store = ActivationStore.create(f"{tmp}/s", StoreMeta(model=lm.model_id, layers=[layer], d=lm.d))
    secs = {"bare": 0.0, "extract": 0.0, "naive": 0.0}
    tokens = 0
    ex.window(list(enumerate(windows[0][:4])))  # warm-up
    for wi, win in enumerate(windows):
        batches, n_tok = padded_batches(lm, win, 2048, args.batch_tokens)
        tokens += n_tok
        t = time.perf_counter()
        for inp, mask in batches:
            bare(inp, mask)
        secs["bare"] += time.perf_counter() - t
        t = time.perf_counter()
        rows = ex.window([(wi * args.window_docs + j, d) for j, d in enumerate(win)])
        store.append({layer: np.concatenate([a[layer] for a in rows.acts])},
                     np.concatenate(rows.token_ids),
                     np.concatenate([np.full(len(t), i) for i, t in zip(rows.doc_index, rows.token_ids, strict=True)]))
        secs["extract"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            for inp, mask in batches:
                lm.model(input_ids=inp, attention_mask=mask, output_hidden_states=True,
                         use_cache=False).hidden_states[layer + 1]
        secs["naive"] += time.perf_counter() - t
    rate = {k: tokens / v for k, v in secs.items()}
    print(f"SmolLM2-135M layer {layer}, {len(docs)} fortune documents, {tokens} tokens, "
          f"torch threads {torch.get_num_threads()}, rows stored {len(store)}")
    print("| path | tokens/s | vs bare truncated forward |")
    print("|---|---|---|")
    for k in ("bare", "extract", "naive"):
        print(f"| {k} | {rate[k]:,.0f} | {rate[k] / rate['bare']:.3f} |")
    print(f"extraction overhead vs bare: {100 * (secs['extract'] / secs['bare'] - 1):.1f}%  "
          f"extraction speed-up vs naive: {secs['naive'] / secs['extract']:.2f}x")


if __name__ == "__main__":
    main()
