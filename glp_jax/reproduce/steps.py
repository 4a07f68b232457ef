"""The parts of a reproduction, each skipped when its output is already complete.

Shared with `make demo` (glp_jax.demo): extraction into train/val stores and the SAE/PCA
baselines. Every evaluation writes <root>/evals/<name>.json through the evaluation's own
function, so `glp eval ...` on the same folders gives the same files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from glp_jax.data.store import ActivationStore
from glp_jax.rundir import RunDir, write_atomic


def extract_stores(root: Path, rows: dict[str, int], *, model: str = "smollm2",
                   corpus: str = "fortune", layer: int | None = None, max_length: int = 2048,
                   batch_tokens: int = 8192, device: str = "cpu",
                   tag: str = "demo") -> dict[str, ActivationStore]:
    """Train and validation stores (`rows` = {split: rows}) of one LLM layer; a complete store
    (enough rows, or the corpus split exhausted) is reused, a partial one resumed."""
    from glp_jax.config import ExtractConfig
    from glp_jax.data.corpus import open_corpus
    from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta
    from glp_jax.llm.loading import load_causal_lm

    stores, lm, text = {}, None, None
    for split, n in rows.items():
        path = root / f"acts_{split}"
        if (path / "glp_store.json").exists():
            store = ActivationStore.open(path)
            if len(store) >= n or store.cursor.get("exhausted"):
                stores[split] = store
                continue
        lm = lm or load_causal_lm(model, device=device)
        text = text or open_corpus(corpus)
        cfg = ExtractConfig(model=model, corpus=corpus, split=split, max_length=max_length,
                            batch_tokens=batch_tokens, device=device,
                            layers=None if layer is None else [layer]).for_model(lm.n_layers)
        meta = extraction_meta(cfg, lm.model_id, lm.d, text.name)
        with ActivationStore.open_for_writing(path, meta, f"glp {tag} extraction") as store:
            print(f"[{tag}] extracting {n:,} {split} rows of layer {cfg.layers[0]} -> "
                  f"{store.url}", flush=True)
            extract_to_store(Extractor(lm, cfg), text, store, n)
        stores[split] = store
    return stores


def train_baselines(stores: dict[str, ActivationStore], root: Path, *, sae_config: str,
                    sae_activations: int, tag: str = "demo") -> dict[str, Path]:
    """The SAE (same pipeline, optimizer and checkpoints as the GLPs) and PCA baselines."""
    from glp_jax.config import load_config
    from glp_jax.pca import PCA_NPZ, fit_pca
    from glp_jax.train import train

    sae_dir, pca_dir = root / "sae", root / "pca"
    if not RunDir(sae_dir).finished():
        cfg = load_config([f"config={sae_config}", f"train_dataset={stores['train'].url}",
                           f"val_dataset={stores['val'].url}", f"output_path={sae_dir}",
                           "num_steps=null", f"num_activations={sae_activations}"])
        width = cfg.sae_width or cfg.sae_expansion * stores["train"].d
        print(f"[{tag}] SAE baseline: {width} latents, k={cfg.sae_k}, "
              f"{cfg.total_steps} steps of {cfg.batch_size} -> {sae_dir}", flush=True)
        train(cfg)
    if not (pca_dir / PCA_NPZ).is_file():
        print(f"[{tag}] PCA baseline (float64, streamed) -> {pca_dir}", flush=True)
        fit_pca(stores["train"]).save(pca_dir)
    return {"sae": sae_dir, "pca": pca_dir}


class Timings:
    """Seconds per part, accumulated over reruns in <root>/timings.json (a resumed
    reproduction reports the time of every part it actually ran, not only the last)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.seconds: dict[str, float] = {}
        if self.path.is_file():
            self.seconds = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}

    @contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            write_atomic(self.path, json.dumps(self.seconds, indent=1))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON at `path` if a previous run wrote it, else `compute()` (which writes it)."""
    if path.is_file():
        return json.loads(path.read_text())
    return compute()
