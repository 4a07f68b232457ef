"""`make demo`: the main job on the embedded default (SmolLM2-135M layer 14, fortune text).

Each step is skipped when its output is already complete, so a rerun is quick.
"""

from __future__ import annotations

import os
import time

from glp_jax.data.corpus import open_corpus
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.llm.extract import Extractor, extract_to_store
from glp_jax.llm.loading import load_causal_lm, middle_layer

DEMO_ROOT = os.environ.get("GLP_DEMO_ROOT", "runs/demo")
TRAIN_ROWS = int(os.environ.get("GLP_DEMO_TRAIN_ROWS", 60_000))
VAL_ROWS = int(os.environ.get("GLP_DEMO_VAL_ROWS", 8_000))


def extract_demo_data(root: str = DEMO_ROOT) -> dict[str, ActivationStore]:
    """Train and validation stores of SmolLM2 layer 14 on the fortune corpus."""
    lm = load_causal_lm("smollm2")
    layer = middle_layer(lm.n_layers)
    corpus = open_corpus("fortune")
    stores = {}
    for split, rows in (("train", TRAIN_ROWS), ("val", VAL_ROWS)):
        meta = StoreMeta(model=lm.model_id, layers=[layer], d=lm.d, tokenizer=lm.model_id,
                         corpus=corpus.name, split=split, seed=42, extra={"val_docs": None})
        store = ActivationStore.open_or_create(f"{root}/acts_{split}", meta)
        if len(store) < rows and not store.cursor.get("exhausted"):
            print(f"[demo] extracting {rows:,} {split} rows of layer {layer} -> {store.url}")
            extract_to_store(Extractor(lm, [layer]), corpus, store, rows, split=split)
        stores[split] = store
    return stores


def run_demo() -> int:
    t0 = time.perf_counter()
    stores = extract_demo_data()
    print("\n| split | rows | d | layer | mean std | store |")
    print("|---|---|---|---|---|---|")
    for split, s in stores.items():
        print(f"| {split} | {len(s):,} | {s.d} | {s.layers[0]} | {s.var().mean() ** 0.5:.3f} | {s.url} |")
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s")
    return 0
