"""Residual-stream extraction from a causal LM into an ActivationStore.

Hook point: the output of decoder layer k, i.e. the residual stream after block k (== HF
`hidden_states[k + 1]` for every layer but the last: HF applies the final norm to its last
hidden state, while the store keeps the un-normalised residual stream there too). The
forward stops right after the deepest requested layer (a hook raises `_StopForward`), so
the rest of the model is never computed.

Determinism and resume: documents are processed in fixed windows of `window_docs`
documents (window w = split documents [w*W, (w+1)*W)), sorted by length inside the window
and packed into padded batches of at most `batch_tokens` tokens. Rows are emitted in
document order and committed only at window boundaries (or at the `max_tokens` cut) with
a cursor (documents done, rows of the next document done). A resumed run recomputes the
window holding the cursor with identical batches and skips what was already committed, so
it reproduces an uninterrupted run bit for bit.

Preemption: with a `PreemptionGuard`, a SIGTERM/SIGINT is honoured at the next window
boundary (the unit of compute: a window's batches are all computed before its rows are
emitted): the rows of finished documents are committed, and `Preempted` is raised; the
caller's `with` releases the writer lock. A window should take well under the grace period
between SIGTERM and SIGKILL (SLURM/spot VMs: ~30 s); lower --window-docs if it does not.

Workers: a `WorkerShard` corpus gives each worker its documents renumbered 0, 1, ...; the
cursor counts those, and `doc_ids` stores their split index (`global_index`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from glp_jax.config import TOKEN_POLICIES, ExtractConfig
from glp_jax.data.corpus import Corpus, Document, StreamingCorpus, WorkerShard
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import GLPError
from glp_jax.llm.loading import LoadedLM
from glp_jax.preempt import PreemptionGuard
from glp_jax.progress import progress_bar


class _StopForward(Exception):
    """Raised by the deepest hook to skip the rest of the model."""


def document_separator_id(tokenizer) -> int:
    """Token to prepend when the tokenizer adds no BOS: what the model saw between documents."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise GLPError("tokenizer has no <|endoftext|>, BOS or EOS token to start documents with")


def tokenizer_adds_bos(tokenizer) -> bool:
    """True if encoding with special tokens puts a token in front (Llama's BOS)."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[-len(plain):] == plain


def tokenize_documents(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per document, starting with a BOS/separator, right-truncated to max_length."""
    adds_bos = tokenizer_adds_bos(tokenizer)
    sep = document_separator_id(tokenizer)
    out = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        if not adds_bos:
            ids = [sep, *ids]
        out.append(list(ids[:max_length]))
    return out


def select_positions(ids: list[int], special_ids: set[int], policy: str, k: int,
                     rng: np.random.Generator | None) -> np.ndarray:
    """Positions whose activations are stored: never position 0 (the attention sink), never
    special tokens; then the policy (all, last, or k random per document, sorted)."""
    pos = np.array([i for i, t in enumerate(ids) if i > 0 and t not in special_ids], np.int64)
    if policy == "all" or pos.size == 0:
        return pos
    if policy == "last":
        return pos[-1:]
    if policy == "k":
        if pos.size <= k:
            return pos
        return np.sort(rng.choice(pos, size=k, replace=False))
    raise GLPError(f"unknown token policy {policy!r}; use one of {TOKEN_POLICIES}")


class TruncatedForward:
    """Runs a HF decoder only up to the deepest requested layer and returns their outputs."""

    def __init__(self, model, layers: list[int]):
        self.model = model
        self.layers = sorted(layers)
        blocks = _decoder_layers(model)
        n = len(blocks)
        for k in self.layers:
            if not 0 <= k < n:
                raise GLPError(f"layer {k} is out of range for a model with {n} decoder layers "
                               f"(valid: 0..{n - 1})")
        self._blocks = blocks
        self._captured: dict[int, object] = {}

    def _hook(self, k: int, last: bool):
        def fn(_module, _inputs, output):
            self._captured[k] = output[0] if isinstance(output, tuple) else output
            if last:
                raise _StopForward

        return fn

    def __call__(self, input_ids, attention_mask) -> dict[int, object]:
        import torch

        handles = [self._blocks[k].register_forward_hook(self._hook(k, k == self.layers[-1]))
                   for k in self.layers]
        self._captured = {}
        try:
            with torch.inference_mode():
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return self._captured


def first_attr(obj, paths: tuple[str, ...], what: str):
    """The first dotted attribute path of `obj` that exists (architectures name parts
    differently: model.layers, transformer.h, ...)."""
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
            return cur
        except AttributeError:
            continue
    raise GLPError(f"cannot find the {what} of {type(obj).__name__} (looked for {paths})")


def _decoder_layers(model):
    return first_attr(model, ("model.layers", "transformer.h", "gpt_neox.layers",
                              "model.decoder.layers"), "decoder layers")


def pack_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into padded batches of <= batch_tokens (sorted by length, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class WindowRows:
    """Stored rows of one window, per document in document order."""

    doc_index: list[int]
    acts: list[dict[int, np.ndarray]]  # per doc: layer -> [n_i, d]
    token_ids: list[np.ndarray]  # per doc: [n_i]
    tokens_run: int  # tokens pushed through the LLM (padding excluded)


class Extractor:
    """Computes stored rows for documents; owns the model, tokenizer and hooks."""

    def __init__(self, lm: LoadedLM, cfg: ExtractConfig):
        self.cfg = cfg.for_model(lm.n_layers)
        self.lm = lm
        self.layers = self.cfg.layers
        self.forward = TruncatedForward(lm.model, self.layers)
        self.max_length = self.cfg.max_length
        self.policy, self.k, self.seed = cfg.token_policy, cfg.tokens_per_doc, cfg.seed
        self.batch_tokens = max(cfg.batch_tokens, cfg.max_length)
        self.device = cfg.device
        self.special = set(lm.tokenizer.all_special_ids)
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    def window(self, docs: list[tuple[int, Document]]) -> WindowRows:
        import torch

        ids = tokenize_documents(self.lm.tokenizer, [d.text for _, d in docs], self.max_length)
        positions = [select_positions(t, self.special, self.policy, self.k,
                                      np.random.default_rng([self.seed, i]))
                     for t, (i, _) in zip(ids, docs, strict=True)]
        acts: list[dict[int, np.ndarray]] = [{} for _ in docs]
        for batch in pack_batches([len(t) for t in ids], self.batch_tokens):
            width = max(len(ids[j]) for j in batch)
            inp = np.full((len(batch), width), self.pad_id, np.int64)
            mask = np.zeros((len(batch), width), np.int64)
            for r, j in enumerate(batch):
                inp[r, : len(ids[j])] = ids[j]
                mask[r, : len(ids[j])] = 1
            out = self.forward(torch.from_numpy(inp).to(self.device),
                               torch.from_numpy(mask).to(self.device))
            for k in self.layers:
                h = out[k].float().cpu().numpy()
                for r, j in enumerate(batch):
                    acts[j][k] = h[r, positions[j]]
        toks = [np.asarray(t, np.int32)[p] for t, p in zip(ids, positions, strict=True)]
        return WindowRows([i for i, _ in docs], acts, toks, sum(len(t) for t in ids))


def _windows(corpus, split, seed, val_docs, start_doc, window_docs) -> Iterator[list]:
    """Fixed windows [w*W, (w+1)*W) of the split, starting with the one holding start_doc."""
    first = (start_doc // window_docs) * window_docs
    it = corpus.iter_split(split, seed=seed, val_docs=val_docs, start=first)
    buf = []
    for item in it:
        buf.append(item)
        if len(buf) == window_docs:
            yield buf
            buf = []
    if buf:
        yield buf


@dataclass
class ExtractResult:
    rows: int
    rows_added: int
    docs_done: int
    tokens_run: int
    seconds: float
    complete: bool  # reached max_tokens or the end of the corpus


def extract_to_store(extractor: Extractor, corpus: Corpus | StreamingCorpus | WorkerShard,
                     store: ActivationStore, max_tokens: int, progress: bool = True,
                     guard: PreemptionGuard | None = None) -> ExtractResult:
    """Append rows to `store` until it holds `max_tokens` rows or the split ends; resumes
    from the store's cursor. Split, seed and batching come from `extractor.cfg`. With a
    `guard`, a stop request commits the finished documents and raises `Preempted`."""
    if max_tokens <= 0:
        raise GLPError(f"max_tokens must be positive, got {max_tokens}")
    cfg = extractor.cfg
    split, corpus_seed, val_docs = cfg.split, cfg.seed, cfg.val_docs
    window_docs, flush_rows = cfg.window_docs, cfg.flush_rows
    meta = store.meta
    asked = {"split": split, "seed": corpus_seed, "token_policy": cfg.token_policy,
             "tokens_per_doc": cfg.tokens_per_doc, "max_length": cfg.max_length,
             "layers": cfg.layers}
    have = {"split": meta.split, "seed": meta.seed, "token_policy": meta.token_policy,
            "tokens_per_doc": meta.tokens_per_doc, "max_length": meta.max_length,
            "layers": sorted(meta.layers)}
    diffs = [f"{k}: store has {have[k]!r}, extraction asks {v!r}" for k, v in asked.items()
             if have[k] != v]
    for key in ("val_docs", "llm_dtype"):
        if meta.extra.get(key, getattr(cfg, key)) != getattr(cfg, key):
            diffs.append(f"{key}: store has {meta.extra.get(key)!r}, extraction asks "
                         f"{getattr(cfg, key)!r}")
    if diffs:
        raise GLPError(f"extraction settings differ from store {store.url}: " + "; ".join(diffs)
                       + ". Nothing was changed; use a new --out path, or rerun with the store's settings")
    if store.cursor.get("window_docs", window_docs) != window_docs:
        window_docs = store.cursor["window_docs"]  # resume with the batching that wrote it
    cursor = store.cursor or {"docs_done": 0, "doc_rows_done": 0}
    docs_done, doc_rows_done = cursor.get("docs_done", 0), cursor.get("doc_rows_done", 0)
    if cursor.get("exhausted"):
        if len(store) == 0:
            raise GLPError(f"corpus split {split!r} produced no storable tokens: nothing to extract")
        return ExtractResult(len(store), 0, docs_done, 0, 0.0, True)
    doc_id = getattr(corpus, "global_index", lambda j: j)
    n0, t0 = len(store), time.perf_counter()
    pending: dict = {"acts": {k: [] for k in extractor.layers}, "tok": [], "doc": [], "n": 0}
    tokens_run = 0
    who = f" worker {corpus.worker}/{corpus.workers}" if isinstance(corpus, WorkerShard) else ""
    bar = _progress(progress, total=max_tokens, initial=min(n0, max_tokens), what=who)

    def flush(cur: dict) -> None:
        if pending["n"] == 0 and cur == store.cursor:
            return
        cat = lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d), np.float32)  # noqa: E731
        store.append({k: cat(v, store.d) for k, v in pending["acts"].items()},
                     np.concatenate(pending["tok"]) if pending["tok"] else np.zeros(0, np.int32),
                     np.concatenate(pending["doc"]) if pending["doc"] else np.zeros(0, np.int32),
                     cursor={**cur, "window_docs": window_docs})
        for v in pending["acts"].values():
            v.clear()
        pending["tok"].clear()
        pending["doc"].clear()
        pending["n"] = 0

    done = len(store) >= max_tokens
    seen_any = False
    for window in (() if done else _windows(corpus, split, corpus_seed, val_docs, docs_done,
                                            window_docs)):
        seen_any = True
        rows = extractor.window(window)
        tokens_run += rows.tokens_run
        for doc_i, acts, toks in zip(rows.doc_index, rows.acts, rows.token_ids, strict=True):
            if doc_i < docs_done:
                continue
            skip = doc_rows_done if doc_i == docs_done else 0
            room = max_tokens - len(store) - pending["n"]
            take = min(len(toks) - skip, room)
            if take > 0:
                for k in extractor.layers:
                    pending["acts"][k].append(acts[k][skip: skip + take])
                pending["tok"].append(toks[skip: skip + take])
                pending["doc"].append(np.full(take, doc_id(doc_i), np.int32))
                pending["n"] += take
                bar.update(take)
            if skip + take < len(toks):  # cut by max_tokens inside this document
                # target_reached tells followers (data_mode=follow) that no more rows come;
                # a later run with a larger max_tokens continues from the cursor regardless.
                flush({"docs_done": doc_i, "doc_rows_done": skip + take, "target_reached": True})
                done = True
                break
            docs_done, doc_rows_done = doc_i + 1, 0
        if done:
            break
        if pending["n"] >= flush_rows:
            flush({"docs_done": docs_done, "doc_rows_done": 0})
        elapsed = time.perf_counter() - t0
        bar.set_postfix(docs=docs_done, tok_s=f"{tokens_run / max(elapsed, 1e-9):.0f}")
        if guard is not None and guard.requested:
            flush({"docs_done": docs_done, "doc_rows_done": 0})
            bar.close()
            raise guard.stop(f"after document {docs_done} of store {store.url}",
                             f"{len(store)} rows committed")
    if not done:
        # End of the split: commit the rest and remember it so reruns return at once.
        flush({"docs_done": docs_done, "doc_rows_done": 0, "exhausted": True})
        if len(store) == 0 and not seen_any:
            bar.close()
            raise GLPError(f"corpus {getattr(corpus, 'name', corpus)} split {split!r} has no "
                           f"documents: nothing to extract")
    elif pending["n"]:
        flush({"docs_done": docs_done, "doc_rows_done": 0, "target_reached": True})
    bar.close()
    if len(store) == 0:
        raise GLPError(f"corpus split {split!r} produced no storable tokens (every document "
                       f"has <= 1 token)")
    return ExtractResult(len(store), len(store) - n0, docs_done, tokens_run,
                         time.perf_counter() - t0, True)


def _progress(enabled: bool, total: int, initial: int, what: str = ""):
    """Named per worker, so the lines of many workers in one log can be told apart."""
    return progress_bar(total, "extract" + what, "row", enabled=enabled, initial=initial,
                        smoothing=0.1)


def extraction_meta(cfg: ExtractConfig, model_id: str, d: int, corpus_name: str) -> StoreMeta:
    """The identity of an extraction store: what a resume must match (see StoreMeta).
    `cfg.layers` must be resolved (`cfg.for_model(n_layers)`)."""
    if cfg.layers is None:
        raise GLPError("extraction_meta needs resolved layers: pass cfg.for_model(n_layers)")
    return StoreMeta(model=model_id, layers=list(cfg.layers), d=d, dtype=cfg.dtype,
                     tokenizer=model_id, corpus=corpus_name, split=cfg.split,
                     token_policy=cfg.token_policy, tokens_per_doc=cfg.tokens_per_doc,
                     max_length=cfg.max_length, seed=cfg.seed,
                     extra={"val_docs": cfg.val_docs, "llm_dtype": cfg.llm_dtype})
