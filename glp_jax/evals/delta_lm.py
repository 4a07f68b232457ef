"""Delta LM loss: how much next-token cross-entropy rises when the layer-k residual stream
is replaced by a reconstruction (GLP on-manifold projection, SAE, PCA, ablations).

Protocol (GLP_SPEC.md section 6, EVAL_PROTOCOL.md "Delta LM loss"), with the original's
padding bug fixed:
- held-out documents, a BOS / document separator first exactly as extraction does,
  truncated to `length` tokens, right-padded;
- the residual after decoder layer k is replaced at every valid position except 0 (the
  attention sink the GLP never saw); padding is never edited;
- loss = next-token cross-entropy averaged over VALID predicted tokens only: per-document
  mean, then mean over documents (the original's doc-weighted metric), and the
  token-weighted mean beside it; delta = loss(method) - loss(no edit).
The LLM runs under `torch.inference_mode()`, seeded, in the dtype it was loaded with
(fp32 for the published protocol).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.evals.recon import Reconstructor, describe_method
from glp_jax.evals.run_llm import run_lm, store_of_run
from glp_jax.llm.intervene import PositionReplacer, edit_layer_output
from glp_jax.progress import progress_bar

RESULT_NAME = "delta_lm"
DEFAULT_N_SEQS, DEFAULT_LENGTH, DEFAULT_SEED = 2048, 128, 42


# -- held-out sequences ---------------------------------------------------------------------

@dataclass
class Sequences:
    """Token ids [N, T] (int64, right-padded with `pad_id`) and their attention mask.
    Every row starts with the BOS / document separator and holds >= 2 valid tokens."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pad_id: int = 0
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, np.int64)
        self.attention_mask = np.asarray(self.attention_mask, np.int64)
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise GLPError(f"input_ids {self.input_ids.shape} and attention_mask "
                           f"{self.attention_mask.shape} must be the same [N, T] shape")
        lengths = self.attention_mask.sum(1)
        right_padded = (self.attention_mask == (np.arange(self.length)[None] < lengths[:, None]))
        if not right_padded.all():
            raise GLPError("sequences must be right-padded (attention_mask = 1...1 0...0)")
        if len(lengths) and lengths.min() < 2:
            raise GLPError("every sequence needs >= 2 tokens (BOS + one token to predict)")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(1)

    @classmethod
    def from_token_lists(cls, ids: Sequence[Sequence[int]], length: int | None = None,
                         pad_id: int = 0, source: dict | None = None) -> Sequences:
        """Right-pad token lists (each already starting with BOS) to `length` (default: the
        longest); longer lists are truncated."""
        length = length or max(len(t) for t in ids)
        inp = np.full((len(ids), length), pad_id, np.int64)
        mask = np.zeros((len(ids), length), np.int64)
        for r, t in enumerate(ids):
            t = list(t)[:length]
            inp[r, : len(t)] = t
            mask[r, : len(t)] = 1
        return cls(inp, mask, pad_id, dict(source or {}, length=length))


def heldout_sequences(tokenizer, corpus, *, n: int = DEFAULT_N_SEQS,
                      length: int = DEFAULT_LENGTH, seed: int = DEFAULT_SEED,
                      val_docs: int | None = None, split: str = "val") -> Sequences:
    """The first `n` documents of the corpus split (seed/val_docs as the extraction that made
    the training store) with >= 1 token besides the BOS, tokenised as extraction does."""
    from glp_jax.data.corpus import open_corpus
    from glp_jax.llm.extract import document_separator_id, tokenize_documents

    if n <= 0 or length < 2:
        raise GLPError(f"need n >= 1 sequences of length >= 2, got n={n}, length={length}")
    if isinstance(corpus, str):
        corpus = open_corpus(corpus)
    ids: list[list[int]] = []
    chunk: list[str] = []

    def take(texts):
        for t in tokenize_documents(tokenizer, texts, length):
            if len(t) >= 2 and len(ids) < n:
                ids.append(t)

    for _, doc in corpus.iter_split(split, seed=seed, val_docs=val_docs):
        chunk.append(doc.text)
        if len(chunk) == 256:
            take(chunk)
            chunk = []
            if len(ids) >= n:
                break
    if chunk and len(ids) < n:
        take(chunk)
    name = getattr(corpus, "name", str(corpus))
    if not ids:
        raise GLPError(f"corpus {name} split {split!r} has no document with a token to predict")
    if len(ids) < n:
        warnings.warn(f"corpus {name} split {split!r} has only {len(ids)} usable documents "
                      f"(asked for {n}); evaluating on {len(ids)}", stacklevel=2)
    pad = tokenizer.pad_token_id
    pad = document_separator_id(tokenizer) if pad is None else int(pad)
    return Sequences.from_token_lists(ids, length, pad, source={
        "corpus": name, "split": split, "seed": seed, "val_docs": val_docs, "requested": n})


def sequences_of_run(run_dir, tokenizer, *, n: int = DEFAULT_N_SEQS,
                     length: int = DEFAULT_LENGTH) -> Sequences:
    """Held-out sequences of the corpus the run was trained on: the store's corpus, seed and
    val_docs give the same permutation and validation split as its extraction."""
    from glp_jax.data.corpus import open_corpus

    _, store = store_of_run(run_dir)
    meta = store.meta
    try:
        corpus = open_corpus(meta.corpus)
    except GLPError as e:
        raise GLPError(f"the run's training corpus {meta.corpus!r} (from {store.url}) cannot be "
                       f"opened here: {e}. Install or copy it to the same path, or pass "
                       f"sequences built with heldout_sequences(tokenizer, CORPUS, seed="
                       f"{meta.seed}, val_docs={meta.extra.get('val_docs')})") from e
    return heldout_sequences(tokenizer, corpus, n=n, length=length, seed=meta.seed,
                             val_docs=meta.extra.get("val_docs"), split="val")


# -- the evaluation -------------------------------------------------------------------------

def _token_ce(model, ids_BxT, mask_BxT):
    """Per-token next-token CE [B, T-1] (float64, 0 where the label is padding) and the
    valid-label mask [B, T-1]."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=ids_BxT, attention_mask=mask_BxT, use_cache=False).logits
    b, t, v = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids_BxT[:, 1:].reshape(-1),
                         reduction="none").view(b, t - 1)
    valid = mask_BxT[:, 1:].bool()
    return torch.where(valid, ce, torch.zeros_like(ce)).double(), valid


class _Arm:
    """Per-document CE sums and counts of one arm (no edit, or one method)."""

    def __init__(self, n_docs: int, recon=None):
        self.sums = np.zeros(n_docs, np.float64)
        self.counts = np.zeros(n_docs, np.int64)
        self.seconds = 0.0
        self.replacer = PositionReplacer(recon) if recon is not None else None

    def doc_losses(self) -> np.ndarray:
        return self.sums / self.counts

    def doc_mean(self) -> float:
        return float(np.mean(self.doc_losses()))

    def token_mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    def timing(self, tokens: int) -> dict:
        out = {"seconds": self.seconds, "tokens_per_s": tokens / max(self.seconds, 1e-12)}
        if self.replacer is not None:
            r = self.replacer
            out.update(recon_seconds=r.recon_seconds, edit_seconds=r.edit_seconds,
                       recon_fraction=r.recon_seconds / max(self.seconds, 1e-12),
                       recon_calls=r.calls, recon_rows=r.rows)
        return out


def evaluate_delta_lm(lm, layer: int, methods: Mapping[str, Reconstructor],
                      sequences: Sequences, *, batch_size: int = 8, seed: int = DEFAULT_SEED,
                      trim_padding: bool = True, progress: bool = True,
                      out_dir=None) -> dict:
    """Delta LM loss of each reconstruction method at decoder layer `layer` of `lm` (a
    LoadedLM). Sequences are processed longest first in batches of `batch_size`, each
    trimmed to its longest row (`trim_padding`), which changes no valid logit.
    `delta[m] = loss[m] - base_loss` (doc-weighted); `*_token_weighted` beside them."""
    import torch

    if not isinstance(sequences, Sequences):
        sequences = Sequences.from_token_lists(sequences)
    if len(sequences) == 0:
        raise GLPError("no sequences to evaluate")
    if batch_size < 1:
        raise GLPError(f"batch_size must be >= 1, got {batch_size}")
    model = lm.model
    device = next(model.parameters()).device
    n = len(sequences)
    lengths = sequences.lengths
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    base = _Arm(n)
    arms = {name: _Arm(n, rec) for name, rec in methods.items()}
    n_input_tokens = int(lengths.sum())
    bar = _progress(progress, total=n_input_tokens * (1 + len(arms)))
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in batches:
                width = int(lengths[idx].max()) if trim_padding else sequences.length
                ids = torch.from_numpy(sequences.input_ids[idx, :width]).to(device)
                mask = torch.from_numpy(sequences.attention_mask[idx, :width]).to(device)
                edit = mask.bool().clone()
                edit[:, 0] = False  # position 0 (BOS / attention sink) is never edited
                batch_tokens = int(lengths[idx].sum())
                for name, arm in [("base", base), *arms.items()]:
                    t0 = time.perf_counter()
                    if arm.replacer is None:
                        ce, valid = _token_ce(model, ids, mask)
                    else:
                        arm.replacer.mask = edit
                        with edit_layer_output(model, layer, arm.replacer):
                            ce, valid = _token_ce(model, ids, mask)
                    arm.sums[idx] = ce.sum(1).cpu().numpy()
                    arm.counts[idx] = valid.sum(1).cpu().numpy()
                    arm.seconds += time.perf_counter() - t0
                    bar.update(batch_tokens)
                    bar.set_postfix_str(name, refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t_start
    recon_s = sum(a.replacer.recon_seconds for a in arms.values())
    base_loss = base.doc_mean()
    base_tw = base.token_mean()
    result = {
        "model": getattr(lm, "model_id", type(model).__name__),
        "layer": int(layer),
        "n_sequences": n,
        "n_tokens": int(base.counts.sum()),  # predicted (valid label) tokens per arm
        "n_edited_positions": int(sequences.attention_mask[:, 1:].sum()),
        "length": sequences.length,
        "base_loss": base_loss,
        "delta": {m: a.doc_mean() - base_loss for m, a in arms.items()},
        "loss": {m: a.doc_mean() for m, a in arms.items()},
        "base_loss_token_weighted": base_tw,
        "delta_token_weighted": {m: a.token_mean() - base_tw for m, a in arms.items()},
        "loss_token_weighted": {m: a.token_mean() for m, a in arms.items()},
        "methods": {m: describe_method(r) for m, r in methods.items()},
        # per-document losses in sequence order: paired intervals between methods
        "doc_loss": {"base": base.doc_losses().tolist(),
                     **{m: a.doc_losses().tolist() for m, a in arms.items()}},
        "sequences": dict(sequences.source),
        "batch_size": batch_size,
        "seed": seed,
        "llm_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": seconds,
        "tokens_per_s": n_input_tokens * (1 + len(arms)) / max(seconds, 1e-12),
        "recon_fraction": recon_s / max(seconds, 1e-12),
        "timing": {"base": base.timing(n_input_tokens),
                   **{m: a.timing(n_input_tokens) for m, a in arms.items()}},
    }
    if out_dir is not None:
        from glp_jax.rundir import write_results

        write_results(Path(out_dir) if isinstance(out_dir, str) else out_dir, RESULT_NAME,
                      result, delta_lm_markdown(result))
    return result


# -- reports --------------------------------------------------------------------------------

def delta_lm_markdown(result: dict) -> str:
    """The paper's Table 2 layout (method | delta LM loss), with the losses beside it."""
    lines = [
        f"# Delta LM loss: {result['model']} layer {result['layer']}",
        "",
        f"{result['n_sequences']} held-out sequences of <= {result['length']} tokens "
        f"({result['n_tokens']:,} predicted tokens), LLM {result['llm_dtype']}; "
        f"base LM loss {result['base_loss']:.4f} (token-weighted "
        f"{result['base_loss_token_weighted']:.4f}).",
        "",
        "| method | delta LM loss | LM loss | delta (token-weighted) |",
        "|---|---|---|---|",
    ]
    for m, d in result["delta"].items():
        lines.append(f"| {m} | {d:.4f} | {result['loss'][m]:.4f} | "
                     f"{result['delta_token_weighted'][m]:.4f} |")
    lines += ["", "Delta = mean over documents of the per-document mean cross-entropy over "
              "valid predicted tokens, minus the same without an edit. Every valid position "
              "but the first is replaced at the layer output.", "",
              f"Time {result['seconds']:.1f} s, {result['tokens_per_s']:.0f} tokens/s over all "
              f"arms, {100 * result['recon_fraction']:.0f}% inside reconstructions."]
    return "\n".join(lines) + "\n"


def summarize_delta_lm(result: dict) -> str:
    """One line: base loss, each method's delta, throughput."""
    deltas = ", ".join(f"{m} {d:+.4f}" for m, d in result["delta"].items())
    return (f"delta LM loss ({result['model']} L{result['layer']}, {result['n_sequences']} seqs, "
            f"base {result['base_loss']:.4f}): {deltas} | {result['seconds']:.0f} s, "
            f"{result['tokens_per_s']:.0f} tok/s, {100 * result['recon_fraction']:.0f}% in "
            f"reconstruction")


def _progress(enabled: bool, total: int):
    return progress_bar(total, "delta-lm", "tok", enabled=enabled, unit_scale=True)


# -- a trained run, end to end (what `glp eval delta-lm RUN` calls) ------------------------

METHODS = ("glp", "identity", "zero", "mean")  # names build_methods understands
DEFAULT_METHODS = ("glp", "zero", "mean")


def build_methods(names: Sequence[str], *, glp=None, mean_D=None, layer: int | None = None,
                  glp_seed: int = 0, sigma0: float = 0.5, steps: int = 20,
                  convention: str = "code") -> dict[str, Reconstructor]:
    """Reconstructors by name: glp (on-manifold projection; needs `glp`), identity, zero,
    mean (needs `mean_D`, the training mean). SAE/PCA reconstructors are passed as objects
    to evaluate_delta_lm."""
    from glp_jax.evals.recon import GLPProjection, Identity, MeanAblation, ZeroAblation

    out: dict[str, Reconstructor] = {}
    for name in names:
        if name == "glp":
            if glp is None:
                raise GLPError("method glp needs a trained GLP (glp_jax.load(run))")
            multi = len(getattr(glp, "layers", [])) > 1 or glp.config.is_multi_layer
            out[name] = GLPProjection(glp, sigma0=sigma0, steps=steps, convention=convention,
                                      seed=glp_seed, layer=layer if multi else None)
        elif name == "identity":
            out[name] = Identity()
        elif name == "zero":
            out[name] = ZeroAblation()
        elif name == "mean":
            if mean_D is None:
                raise GLPError("method mean needs the training mean (the run's normalizer)")
            out[name] = MeanAblation(np.asarray(mean_D, np.float32))
        else:
            raise GLPError(f"unknown delta-lm method {name!r}; choose from {list(METHODS)} "
                           f"(SAE/PCA: pass their reconstructors to evaluate_delta_lm)")
    return out


def delta_lm_of_run(run_dir, *, methods: Sequence[str] = DEFAULT_METHODS,
                    n_seqs: int = DEFAULT_N_SEQS, length: int = DEFAULT_LENGTH,
                    batch_size: int = 8, step: int | str = "latest", layer: int | None = None,
                    lm=None, device: str = "cpu", extra_methods: Mapping | None = None,
                    out_dir=None, write: bool = True, progress: bool = True,
                    glp_seed: int = 0, sigma0: float = 0.5, steps: int = 20,
                    convention: str = "code", seed: int = DEFAULT_SEED) -> dict:
    """Delta LM loss of a trained run on held-out documents of its training corpus. Loads
    the run's LLM (fp32) unless `lm` is given; writes <run>/evals/delta_lm.{json,md}
    (or to `out_dir`) unless write=False."""
    from glp_jax.layers import layer_position
    from glp_jax.rundir import EVALS_DIR, RunDir

    lm, layer, store = run_lm(run_dir, layer, lm, device)
    run_layers = [int(k) for k in RunDir(run_dir).resolved().get("layers") or store.meta.layers]
    glp = None
    if "glp" in methods:
        from glp_jax.api import load

        glp = load(run_dir, step=step)
    mean_D = None
    if "mean" in methods:
        mean = np.asarray(RunDir(run_dir).normalizer().mean)
        pos = layer_position(run_layers, layer)
        mean_D = mean if pos is None else mean[pos]
    recons = build_methods(methods, glp=glp, mean_D=mean_D, layer=layer, glp_seed=glp_seed,
                           sigma0=sigma0, steps=steps, convention=convention)
    recons.update(extra_methods or {})
    seqs = sequences_of_run(run_dir, lm.tokenizer, n=n_seqs, length=length)
    if write and out_dir is None:
        out_dir = RunDir(run_dir) / EVALS_DIR
    result = evaluate_delta_lm(lm, layer, recons, seqs, batch_size=batch_size, seed=seed,
                               progress=progress)
    result["run"] = str(run_dir)
    result["step"] = getattr(glp, "step", None)
    if write:
        from glp_jax.rundir import write_results

        out_dir = Path(out_dir) if isinstance(out_dir, str) else out_dir
        write_results(out_dir, RESULT_NAME, result, delta_lm_markdown(result))
    return result
