"""Probing features of a task's texts at one LLM layer, for each method compared in Table 4.

- `raw`: the residual stream after decoder layer k at each text's last token;
- `mlp`: that layer's MLP neurons (input of its down projection) at the same token;
- `glp`: the GLP's meta-neurons of the raw residual (GLP_SPEC.md section 3): normalise,
  noise once to sigma (0.1 for comparisons, 0.5 for scaling), one forward pass, every
  block's `a`; feature index = block * H + unit;
- `sae`: SAE latents of the raw residual; `pca`: projections on the top-k principal
  directions (centred at the PCA mean).

GLP noise. The original draws the noise of a whole split from one torch Generator seeded
42 and re-created for each split, so test row i gets train row i's noise and the numbers
depend on the batch size. Here every row gets its own key,
    fold_in(fold_in(key(seed), crc32(split)), row_id),
so a row's noise depends only on (seed, split, its index in the split): never on its
content, its batch or the chunk size, and train and test rows with the same index get
different noise.

Memory. A Llama-1B d24 GLP has 24 x 8192 = 196,608 meta-neurons per row (786 KB in
float32; 0.8 GB for 1,024 training rows). Features are computed in row chunks of
`chunk_rows(n_features)` (about 256 MB each). `TaskFeatures` keeps the full train/test
matrices only when they fit `cache_bytes` (default 2 GiB); otherwise the 1-D prefilter
statistic is accumulated chunk by chunk and only the selected columns are recomputed (one
more GLP pass). Dense probing needs the full matrix (per GLP block by default, so one
block's columns at a time).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax.chunks import bucket
from glp_jax.errors import GLPError

CHUNK_BYTES = 256 * 2**20
CACHE_BYTES = 2 * 2**30


def chunk_rows(n_features: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so a float32 chunk of features stays within `budget_bytes` (a power of
    two in [16, 4096])."""
    rows = max(1, budget_bytes // (4 * max(1, n_features)))
    return int(min(4096, max(16, 2 ** int(np.floor(np.log2(rows))))))


def split_key(seed: int, split: str) -> jax.Array:
    """The base key of one split's noise: fold_in(key(seed), crc32(split))."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(split.encode()) & 0x7FFFFFFF)


# -- GLP meta-neurons with per-row noise --------------------------------------------------------

@partial(nnx.jit, static_argnums=(6,))
def _meta(model, x_norm, row_ids, base_key, sigma, layer_ids, with_cols, cols):
    d = x_norm.shape[1]
    eps = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(base_key, r), (d,),
                                               jnp.float32))(row_ids)
    s = jnp.asarray(sigma, jnp.float32)
    z = (1.0 - s) * x_norm + s * eps
    sigma_B = jnp.full((x_norm.shape[0],), s)
    _, a_LxBxH = model(z, sigma_B, layer_ids, return_meta=True)
    feats = jnp.transpose(a_LxBxH, (1, 0, 2)).reshape(x_norm.shape[0], -1)
    return feats[:, cols] if with_cols else feats


def glp_meta_neurons(glp, acts_NxD, *, sigma: float = 0.1, seed: int = 0, split: str = "train",
                     row_ids=None, cols=None, layer: int | None = None,
                     chunk: int | None = None) -> np.ndarray:
    """Meta-neurons [N, n_layers * H] (or only `cols`) of raw activations, each row noised
    with its own key (module docstring). row_ids default to 0..N-1 (the row's index in its
    split). Rows go through the model in chunks padded to one compiled shape."""
    acts = np.asarray(acts_NxD, np.float32)
    n = acts.shape[0]
    row_ids = np.arange(n) if row_ids is None else np.asarray(row_ids)
    if len(row_ids) != n:
        raise GLPError(f"{len(row_ids)} row ids for {n} rows")
    cfg = glp.config
    n_feat = cfg.n_layers * cfg.d_mlp
    cols_j = jnp.zeros((0,), jnp.int32) if cols is None else jnp.asarray(cols, jnp.int32)
    width = n_feat if cols is None else len(cols_j)
    chunk = chunk or chunk_rows(n_feat)
    bs = chunk if n >= chunk else bucket(n, min(16, chunk))
    pos, layer_ids = glp.layer_args(layer, bs)
    base = split_key(seed, split)
    out = np.empty((n, width), np.float32)
    for start in range(0, n, bs):
        part = acts[start:start + bs]
        ids = row_ids[start:start + bs].astype(np.uint32)
        m = len(part)
        if m < bs:
            part = np.concatenate([part, np.zeros((bs - m, part.shape[1]), np.float32)])
            ids = np.concatenate([ids, np.zeros(bs - m, np.uint32)])
        x = glp.normalizer.normalize(jnp.asarray(part), pos)
        feats = _meta(glp.model, x, jnp.asarray(ids), base, sigma, layer_ids,
                      cols is not None, cols_j)
        out[start:start + m] = np.asarray(feats)[:m]
    return out


# -- feature methods ----------------------------------------------------------------------------

@dataclass
class FeatureMethod:
    """Turns a task's LLM activations (`source`: resid or mlp) into probing features.
    `transform(x, split, row_ids, cols)` -> float32 [n, F] (or [n, len(cols)])."""

    name: str
    kind: str  # raw | mlp | glp | sae | pca
    source: str = "resid"
    label: str = ""
    block_size: int | None = None  # GLP: H, so feature f is (block f // H, unit f % H)
    obj: object = None  # LoadedGLP / LoadedSAE / PCA
    sigma: float = 0.1
    seed: int = 0
    pca_k: int = 32
    layer: int | None = None
    info: dict = field(default_factory=dict)

    def width(self, d_source: int) -> int:
        if self.kind in ("raw", "mlp"):
            return d_source
        if self.kind == "glp":
            return self.obj.config.n_layers * self.obj.config.d_mlp
        if self.kind == "sae":
            return self.obj.config.n_latents
        if self.kind == "pca":
            return self.pca_k
        raise GLPError(f"unknown feature method {self.kind}")

    def transform(self, x, split: str, row_ids, cols=None) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.kind in ("raw", "mlp"):
            return x if cols is None else x[:, cols]
        if self.kind == "glp":
            return glp_meta_neurons(self.obj, x, sigma=self.sigma, seed=self.seed, split=split,
                                    row_ids=row_ids, cols=cols, layer=self.layer)
        if self.kind == "sae":
            z = self.obj.encode(x)
        elif self.kind == "pca":
            v = self.obj.components_DxD[:, : self.pca_k].astype(np.float32)
            z = (x - self.obj.mean_D.astype(np.float32)) @ v
        else:
            raise GLPError(f"unknown feature method {self.kind}")
        return z if cols is None else z[:, cols]

    def decode(self, feature: int) -> dict:
        """Where a flattened feature index lives (GLP: block and unit)."""
        if self.block_size:
            return {"block": int(feature) // self.block_size, "unit": int(feature) % self.block_size}
        return {}

    def describe(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "label": self.label or self.name,
               "source": self.source, **self.info}
        if self.kind == "glp":
            out.update(sigma=self.sigma, seed=self.seed, blocks=self.obj.config.n_layers,
                       block_size=self.block_size, source_path=getattr(self.obj, "source", None),
                       step=getattr(self.obj, "step", None))
        if self.kind == "pca":
            out["k"] = self.pca_k
        if self.kind == "sae":
            out.update(width=self.obj.config.n_latents, k=self.obj.config.k,
                       source_path=getattr(self.obj, "source", None))
        return out


def raw_method() -> FeatureMethod:
    return FeatureMethod("raw", "raw", "resid", "Raw layer output")


def mlp_method() -> FeatureMethod:
    return FeatureMethod("mlp", "mlp", "mlp", "LLM MLP neurons")


def glp_method(glp, *, sigma: float = 0.1, seed: int = 0, name: str = "glp", label: str = "",
               layer: int | None = None) -> FeatureMethod:
    multi = len(getattr(glp, "layers", [])) > 1 or glp.config.is_multi_layer
    return FeatureMethod(name, "glp", "resid", label or f"GLP d{glp.config.n_layers}",
                         block_size=int(glp.config.d_mlp), obj=glp, sigma=float(sigma),
                         seed=int(seed), layer=layer if multi else None)


def sae_method(sae, *, name: str = "sae", label: str = "") -> FeatureMethod:
    return FeatureMethod(name, "sae", "resid", label or f"SAE k={sae.config.k}, "
                         f"{sae.config.n_latents} latents", obj=sae)


def pca_method(pca, k: int = 32, *, name: str = "", label: str = "") -> FeatureMethod:
    if not 1 <= k <= pca.d:
        raise GLPError(f"PCA k={k} must be in 1..{pca.d}")
    return FeatureMethod(name or f"pca-k{k}", "pca", "resid", label or f"PCA k={k}", obj=pca,
                         pca_k=int(k))


# -- a task's LLM activations -------------------------------------------------------------------

def task_inputs(task, lm=None, layer: int | None = None, *, mlp: bool = True,
                max_length: int = 512, batch_size: int = 32,
                progress: bool = False) -> dict[str, np.ndarray]:
    """{"resid": [N, d]} (+ "mlp") at each text's last token (cached activations of an
    original-layout task give resid only)."""
    if task.acts is not None:
        return {"resid": np.asarray(task.acts, np.float32)}
    if lm is None or layer is None:
        raise GLPError(f"task {task.name} holds texts: features need the LLM and its layer")
    from glp_jax.llm.last_token import last_token_activations

    return last_token_activations(lm, layer, task.texts, max_length=max_length,
                                  batch_size=batch_size, mlp=mlp, progress=progress)


class TaskFeatures:
    """One method's features of one task's train and test rows, computed lazily in chunks;
    full matrices are kept when they fit `cache_bytes` (module docstring)."""

    def __init__(self, method: FeatureMethod, inputs: dict, task,
                 cache_bytes: int = CACHE_BYTES):
        if method.source not in inputs:
            raise GLPError(f"method {method.name} needs {method.source} activations, which "
                           f"task {task.name} does not have")
        self.method = method
        x = inputs[method.source]
        self.x = {"train": x[task.train_idx], "test": x[task.test_idx]}
        self.n_features = method.width(x.shape[1])
        self.chunk = chunk_rows(self.n_features)
        self.cache = 4 * self.n_features * len(x) <= cache_bytes
        self._full: dict[str, np.ndarray] = {}

    def _compute(self, split: str, cols=None) -> np.ndarray:
        x = self.x[split]
        if self.method.kind == "glp":  # chunks inside, with the per-row keys
            return self.method.transform(x, split, np.arange(len(x)), cols)
        parts = [self.method.transform(x[s:s + self.chunk], split,
                                       np.arange(s, min(len(x), s + self.chunk)), cols)
                 for s in range(0, len(x), self.chunk)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def matrix(self, split: str, cols=None) -> np.ndarray:
        """[n_split, F] (or the columns `cols`)."""
        if self.cache:
            if split not in self._full:
                self._full[split] = self._compute(split)
            full = self._full[split]
            return full if cols is None else full[:, np.asarray(cols)]
        return self._compute(split, cols)

    def mean_diff(self, y_train) -> np.ndarray:
        """mean over positives - mean over negatives of every train feature (float64), on raw
        (unstandardised) features; chunked when the matrix is not cached."""
        y = np.asarray(y_train).astype(bool)
        if self.cache:
            x = self.matrix("train")
            return x[y].mean(0, dtype=np.float64) - x[~y].mean(0, dtype=np.float64)
        sp = np.zeros(self.n_features, np.float64)
        sn = np.zeros(self.n_features, np.float64)
        x = self.x["train"]
        for s in range(0, len(x), self.chunk):
            rows = np.arange(s, min(len(x), s + self.chunk))
            f = self.method.transform(x[rows], "train", rows) if self.method.kind != "glp" else \
                glp_meta_neurons(self.method.obj, x[rows], sigma=self.method.sigma,
                                 seed=self.method.seed, split="train", row_ids=rows,
                                 layer=self.method.layer, chunk=self.chunk)
            sp += f[y[rows]].sum(0, dtype=np.float64)
            sn += f[~y[rows]].sum(0, dtype=np.float64)
        return sp / y.sum() - sn / (~y).sum()
