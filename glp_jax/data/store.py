"""ActivationStore: LLM activations in tensorstore zarr3 arrays with a commit protocol.

Layout under the store root (a local path or any tensorstore kvstore URL: memory://,
gs://, s3://, file://):

    glp_store.json       metadata written once at creation (model, layers, d, dtype, ...)
    commit.npz           the committed row count, the writer's resume cursor and float64
                         running moments per layer; written last, as one atomic key write
    layer_{k}/           zarr3 [capacity, d] array per hooked layer (bf16 or fp32)
    token_ids/           zarr3 [capacity] int32, the token at each row
    doc_ids/             zarr3 [capacity] int32, the document index of each row

The row axis is preallocated (zarr chunks are sparse, so unwritten rows cost nothing).
`append` writes the data of rows [n, n+m) to every array, waits until tensorstore reports
those writes durable, and only then replaces `commit.npz`. Readers see `len(store)` =
committed rows, so a writer killed at any point leaves a store that opens cleanly; bytes
past the committed count are garbage that the next append overwrites.
Every chunk and every shard index carries a crc32c checksum (zarr3 `crc32c` codec; older
stores have it on the shard index only, and stay readable), so a flipped bit or a truncated
shard is a read error naming the layer and rows, never silently wrong data; `glp store
verify` (glp_jax/data/verify.py) checks a whole store.

One writer per store: `open_for_writing` holds the store's writer lock (glp_jax/lock.py)
until `close()`; any number of readers, which never need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from glp_jax.data.stats import Moments
from glp_jax.errors import NonFiniteActivationError, StoreError, StoreMismatchError
from glp_jax.kv import child_spec as _child
from glp_jax.kv import context_for as _context_for
from glp_jax.kv import kvstore_spec
from glp_jax.version import __version__

FORMAT = "glp_jax.activation_store"
FORMAT_VERSION = 1
META_KEY = "glp_store.json"
COMMIT_KEY = "commit.npz"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
DEFAULT_CAPACITY = 2**34  # rows; zarr chunks are sparse so this costs nothing on disk
# Fields that must match when a writer re-opens a store to append (the rest is informative).
IDENTITY_FIELDS = ("model", "layers", "d", "dtype", "hook", "corpus", "split", "token_policy",
                   "tokens_per_doc", "max_length", "seed", "extra")

@dataclass
class StoreMeta:
    """What was extracted, from which model, and how. Saved as glp_store.json."""

    model: str
    layers: list[int]
    d: int
    dtype: str = "bfloat16"
    hook: str = "resid_post"  # output of decoder layer k == HF hidden_states[k + 1]
    tokenizer: str = ""
    corpus: str = ""
    split: str = "train"
    token_policy: str = "all"  # all | last | k
    tokens_per_doc: int = 0  # k for the "k" policy
    max_length: int = 2048
    seed: int = 0
    created_by: str = field(default_factory=lambda: f"glp_jax {__version__}")
    shard_rows: int = 16384
    chunk_rows: int = 32  # rows per inner chunk: BENCHMARKS.md (input) says why 32
    capacity: int = DEFAULT_CAPACITY
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.layers = [int(k) for k in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise StoreError(f"layers must be a non-empty list of distinct ints, got {self.layers}")
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r} unsupported; use one of {sorted(DTYPES)}")
        if self.d <= 0:
            raise StoreError(f"d must be positive, got {self.d}")
        if self.shard_rows % self.chunk_rows:
            raise StoreError("shard_rows must be a multiple of chunk_rows")

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_json(obj: dict) -> StoreMeta:
        if obj.get("format") != FORMAT:
            raise StoreError(f"{META_KEY} is not a glp_jax activation store (format={obj.get('format')!r})")
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(f"store format_version {obj['format_version']} is newer than this glp_jax "
                             f"({FORMAT_VERSION}); upgrade glp_jax to read it")
        names = {f.name for f in dataclasses.fields(StoreMeta)}
        return StoreMeta(**{k: v for k, v in obj.items() if k in names})


@dataclass(frozen=True)
class Commit:
    """The committed state: rows visible to readers, resume cursor, per-layer moments."""

    rows: int
    cursor: dict
    moments: dict[int, Moments]
    seq: int = 0  # increments on every commit; lets a follower notice progress

    def to_bytes(self) -> bytes:
        layers = sorted(self.moments)
        buf = io.BytesIO()
        np.savez(
            buf,
            rows=np.int64(self.rows),
            seq=np.int64(self.seq),
            cursor=np.frombuffer(json.dumps(self.cursor).encode(), np.uint8),
            layers=np.asarray(layers, np.int64),
            count=np.asarray([self.moments[k].count for k in layers], np.int64),
            mean=np.stack([self.moments[k].mean for k in layers]),
            m2=np.stack([self.moments[k].m2 for k in layers]),
        )
        return buf.getvalue()

    @staticmethod
    def from_bytes(raw: bytes) -> Commit:
        z = np.load(io.BytesIO(raw), allow_pickle=False)
        layers = [int(k) for k in z["layers"]]
        moments = {k: Moments(int(z["count"][i]), z["mean"][i], z["m2"][i])
                   for i, k in enumerate(layers)}
        cursor = json.loads(z["cursor"].tobytes().decode())
        return Commit(int(z["rows"]), cursor, moments, int(z["seq"]))


def _array_spec(kv, shape, dtype: str, shard_rows: int, chunk_rows: int) -> dict:
    inner = [chunk_rows, *shape[1:]]
    return {
        "driver": "zarr3",
        "kvstore": kv,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [shard_rows, *shape[1:]]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": inner,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "crc32c"}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
            }}],
        },
    }


def moments_summary(mo: Moments) -> dict:
    """The per-layer statistics `glp store info` prints (None for an empty layer)."""
    return {"count": mo.count,
            "mean_abs_mean": float(np.abs(mo.mean).mean()) if mo.count else None,
            "mean_std": float(mo.std.mean()) if mo.count else None,
            "max_std": float(mo.std.max()) if mo.count else None,
            "min_std": float(mo.std.min()) if mo.count else None}


class LayerStats:
    """What every store view derives from `meta`, `url` and `moments(layer)`."""

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def d(self) -> int:
        return self.meta.d

    def mean(self, layer: int | None = None) -> np.ndarray:
        return self.moments(layer).mean

    def var(self, layer: int | None = None) -> np.ndarray:
        return self.moments(layer).var

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            if len(self.meta.layers) != 1:
                raise StoreError(f"store holds layers {self.meta.layers}; name one with layer=")
            return self.meta.layers[0]
        if layer not in self.meta.layers:
            raise StoreError(f"layer {layer} is not in store {self.url} (layers {self.meta.layers})")
        return layer


class ActivationStore(LayerStats):
    """Per-layer activation rows plus token/document ids and float64 statistics.

    Open with `ActivationStore.open(url)` (existing), `create(url, meta)` (new), or
    `open_or_create(url, meta)` (resume a compatible store, create otherwise).
    """

    def __init__(self, url: str, meta: StoreMeta, context: ts.Context, kv: ts.KvStore):
        self.url = str(url)
        self.meta = meta
        self._context = context
        self._kv = kv
        self._lock = None  # a WriterLock when opened with open_for_writing
        base = kvstore_spec(self.url)
        open_arr = lambda name: ts.open(  # noqa: E731
            {"driver": "zarr3", "kvstore": _child(base, name),
             # write all-zero chunks too: a missing shard file then always means damage
             "store_data_equal_to_fill_value": True}, context=context, open=True
        )
        try:
            self._acts = {k: open_arr(f"layer_{k}") for k in meta.layers}
            self._token_ids = open_arr("token_ids")
            self._doc_ids = open_arr("doc_ids")
            self._acts = {k: f.result() for k, f in self._acts.items()}
            self._token_ids = self._token_ids.result()
            self._doc_ids = self._doc_ids.result()
        except ValueError as e:
            raise StoreError(f"store {self.url} is incomplete or corrupt: a zarr array is missing "
                             f"or unreadable ({e}). Re-extract into a new --out path.") from e
        self._commit = self._read_commit()

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, url: str, meta: StoreMeta) -> ActivationStore:
        _refuse_file(url)
        context = _context_for(url)
        kv = ts.KvStore.open(kvstore_spec(url), context=context).result()
        if kv.read(META_KEY).result().state == "value":
            raise StoreError(f"{url} already holds a store; open it, or choose a new path")
        base = kvstore_spec(url)
        shape2 = (meta.capacity, meta.d)
        futures = [ts.open(_array_spec(_child(base, f"layer_{k}"), shape2, meta.dtype,
                                       meta.shard_rows, meta.chunk_rows),
                           context=context, create=True)
                   for k in meta.layers]
        for name in ("token_ids", "doc_ids"):
            futures.append(ts.open(_array_spec(_child(base, name), (meta.capacity,), "int32",
                                               meta.shard_rows, min(1024, meta.shard_rows)),
                                 context=context, create=True))
        for f in futures:
            f.result()
        empty = Commit(0, {}, {k: Moments.zeros((meta.d,)) for k in meta.layers}, 0)
        kv.write(COMMIT_KEY, empty.to_bytes()).result()
        # The metadata goes last: a path holding glp_store.json is a complete, empty store.
        kv.write(META_KEY, json.dumps(meta.to_json(), indent=1).encode()).result()
        return cls(url, meta, context, kv)

    @classmethod
    def open(cls, url: str) -> ActivationStore:
        context = _context_for(url)
        local = "://" not in str(url)
        if local and os.path.exists(url) and not os.path.isdir(url):
            raise StoreError(f"no activation store at {url}: it is a file; a store is the folder "
                             f"written by `glp extract --out`")
        if local and not os.path.isdir(url):
            raise StoreError(f"no activation store at {url}: the directory does not exist. "
                             f"Create one with `glp extract --out {url} ...`.")
        kv = ts.KvStore.open(kvstore_spec(url), context=context).result()
        raw = kv.read(META_KEY).result()
        if raw.state != "value" and kv.read("glp_workers.json").result().state == "value":
            from glp_jax.data.multistore import MultiWorkerStore  # many workers, one store

            return MultiWorkerStore.open(url)
        if raw.state != "value" and kv.read(COMMIT_KEY).result().state == "value":
            raise StoreError(f"{url}: creating this store was interrupted ({COMMIT_KEY} but no "
                             f"{META_KEY}); it holds no rows. Delete the folder and rerun.")
        if raw.state != "value":
            raise StoreError(f"{url} is not an activation store (no {META_KEY}). Point at the "
                             f"directory written by `glp extract`, or import original data with "
                             f"`glp store import-original`.")
        try:
            meta = StoreMeta.from_json(json.loads(raw.value))
        except (json.JSONDecodeError, TypeError) as e:
            raise StoreError(f"{url}/{META_KEY} is corrupt ({e}); the store cannot be trusted") from e
        return cls(url, meta, context, kv)

    @classmethod
    def open_or_create(cls, url: str, meta: StoreMeta) -> ActivationStore:
        """Resume an existing compatible store, or create one. Mismatch leaves it untouched."""
        try:
            store = cls.open(url)
        except StoreError:
            if _holds_store(url):
                raise
            return cls.create(url, meta)
        if not isinstance(store, ActivationStore):  # a multi-worker root (multistore.py)
            raise StoreError(f"{url} holds a multi-worker store; write to it with "
                             f"--worker I --workers N, or use a new path")
        store.check_compatible(meta)
        return store

    @classmethod
    def open_for_writing(cls, url: str, meta: StoreMeta, what: str = "glp extract") -> ActivationStore:
        """`open_or_create` under the store's writer lock (refused while another writer
        holds it); `append` checks the lock is still ours, `close()` releases it."""
        from glp_jax.lock import WriterLock

        _refuse_file(url)
        lock = WriterLock(url, what).acquire()
        try:
            store = cls.open_or_create(url, meta)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    def close(self) -> None:
        """Release the writer lock, if this handle holds it (readers hold nothing)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def checksums(self) -> str:
        """'chunks+index' (crc32c on every chunk and shard index), 'index' or 'none'."""
        codecs = self._acts[self.meta.layers[0]].codec.to_json().get("codecs", [])
        shard = next((c["configuration"] for c in codecs if c.get("name") == "sharding_indexed"),
                     {})
        crc = lambda chain: any(c.get("name") == "crc32c" for c in chain)  # noqa: E731
        if crc(shard.get("codecs", [])) and crc(shard.get("index_codecs", [])):
            return "chunks+index"
        return "index" if crc(shard.get("index_codecs", [])) else "none"

    def check_compatible(self, meta: StoreMeta) -> None:
        mine, theirs = dataclasses.asdict(self.meta), dataclasses.asdict(meta)
        diffs = [f"{k}: store has {mine[k]!r}, requested {theirs[k]!r}"
                 for k in IDENTITY_FIELDS if mine[k] != theirs[k]]
        if diffs:
            raise StoreMismatchError(
                f"store {self.url} was written with different settings: " + "; ".join(diffs)
                + ". Nothing was changed. Use a new --out path, or rerun with the store's settings.")

    # ----------------------------------------------------------------- committed state
    def _read_commit(self) -> Commit:
        raw = self._kv.read(COMMIT_KEY).result()
        if raw.state != "value":
            raise StoreError(f"store {self.url} has no {COMMIT_KEY}; it is incomplete. "
                             f"Re-extract into a new --out path.")
        try:
            return Commit.from_bytes(raw.value)
        except Exception as e:  # noqa: BLE001 - any decode failure means corruption
            raise StoreError(f"{self.url}/{COMMIT_KEY} is corrupt ({e})") from e

    def refresh(self) -> int:
        """Re-read the commit record (rows appended by another process become visible)."""
        self._commit = self._read_commit()
        return len(self)

    def __len__(self) -> int:
        return self._commit.rows

    @property
    def cursor(self) -> dict:
        return dict(self._commit.cursor)

    @property
    def commit_seq(self) -> int:
        return self._commit.seq

    def moments(self, layer: int | None = None) -> Moments:
        return self._commit.moments[self._layer(layer)]

    # ----------------------------------------------------------------- writing
    def append(self, acts: Mapping[int, np.ndarray], token_ids: np.ndarray, doc_ids: np.ndarray,
               cursor: dict | None = None) -> int:
        """Write rows for every layer, make them durable, then commit. Returns the new length.

        Refuses (NonFiniteActivationError) rows holding NaN/Inf: nothing is written.
        """
        token_ids = np.asarray(token_ids, np.int32).reshape(-1)
        doc_ids = np.asarray(doc_ids, np.int32).reshape(-1)
        m = token_ids.shape[0]
        if doc_ids.shape[0] != m:
            raise StoreError(f"token_ids ({m}) and doc_ids ({doc_ids.shape[0]}) differ in length")
        if set(acts) != set(self.meta.layers):
            raise StoreError(f"append got layers {sorted(acts)}, store holds {self.meta.layers}")
        cast = {}
        for k, x in acts.items():
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[1] != self.meta.d or x.shape[0] != m:
                raise StoreError(f"layer {k}: expected [{m}, {self.meta.d}] activations, got "
                                 f"{list(x.shape)}; the store was made for d={self.meta.d}")
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                rows = np.flatnonzero(bad)
                raise NonFiniteActivationError(
                    f"layer {k}: {rows.size} of {m} rows contain NaN/Inf (first at document "
                    f"{int(doc_ids[rows[0]])}); nothing was written. Run the LLM in float32, or "
                    f"check the model weights.")
            cast[k] = x.astype(DTYPES[self.meta.dtype])
        lock = self._lock
        if lock is not None:
            lock.check()  # another writer took the store over: write nothing
        n0 = len(self)
        if n0 + m > self.meta.capacity:
            raise StoreError(f"store capacity {self.meta.capacity} rows would be exceeded")
        if m:
            sl = slice(n0, n0 + m)
            futures = [self._acts[k][sl].write(v) for k, v in cast.items()]
            futures.append(self._token_ids[sl].write(token_ids))
            futures.append(self._doc_ids[sl].write(doc_ids))
            for f in futures:
                f.result()  # durable (file driver fsyncs) before the commit below
        moments = {k: self._commit.moments[k].merge(Moments.of(v)) for k, v in cast.items()}
        new = Commit(n0 + m, dict(cursor if cursor is not None else self._commit.cursor), moments,
                     self._commit.seq + 1)
        if lock is not None:
            lock.check()  # the rows past the commit are garbage until committed: safe to stop
        self._kv.write(COMMIT_KEY, new.to_bytes()).result()
        self._commit = new
        return new.rows

    # ----------------------------------------------------------------- reading
    def _check_indices(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)}) of store {self.url}")

    def read_rows(self, idx: Sequence[int] | np.ndarray, layer: int | None = None) -> np.ndarray:
        """Rows `idx` (any order, repeats allowed) as float32 [B, d]; one tensorstore read."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        self._check_indices(idx)
        k = self._layer(layer)
        with self._reading(f"layer {k}", idx):
            return _read_indexed(self._acts[k], idx).astype(np.float32, copy=False)

    def read_range(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        return self.read_raw(start, stop, layer).astype(np.float32, copy=False)

    def read_raw(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        """Rows in the stored dtype (bf16 bit-exact), for export and round-trip checks."""
        stop = min(stop, len(self))
        if start < 0 or start > stop:
            raise IndexError(f"bad range [{start}, {stop}) for store of {len(self)} rows")
        k = self._layer(layer)
        with self._reading(f"layer {k}", np.array([start, max(start, stop - 1)])):
            return np.asarray(self._acts[k][start:stop].read().result())

    def read_raw_future(self, start: int, stop: int, layer: int | None = None) -> PendingRead:
        """Start reading rows [start, stop) in the stored dtype; `.result()` waits for them.
        Many reads in flight at once overlap their I/O (the block-shuffle loader)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"bad range [{start}, {stop}) for store of {len(self)} rows")
        k = self._layer(layer)
        return PendingRead(self, f"layer {k}", start, stop, self._acts[k][start:stop].read())

    @contextlib.contextmanager
    def _reading(self, array: str, idx: np.ndarray):
        """Turn a tensorstore read failure (checksum mismatch, truncated shard, unreadable
        file) into one StoreError naming the store, the array and the damaged rows."""
        try:
            yield
        except ValueError as e:
            lo, hi, reason = self.damaged_rows(array, str(e), idx)
            raise StoreError(
                f"store {self.url}: {array} rows [{lo}, {hi}) cannot be read: {reason}. "
                f"`glp store verify {self.url}` lists every damaged range; re-extract into a "
                f"new store, or restore this one from a copy") from None

    def damaged_rows(self, array: str, message: str, idx: np.ndarray) -> tuple[int, int, str]:
        """(first row, end row, reason) of a failed read of `array` ("layer K", "token_ids",
        "doc_ids"), from the shard key and chunk tensorstore names in `message`."""
        shard = re.search(r"/c/(\d+)", message)
        entry = re.search(r"shard entry \{(\d+)", message)
        if "Digest mismatch" in message:
            reason = "checksum mismatch (the bytes changed after they were written)"
        else:
            reason = message.splitlines()[0][:200]
        if "shard index" in message or "Error decoding shard" in message:
            reason = "the shard file is truncated or its index is corrupt"
        if shard is None:
            return int(idx.min()) if idx.size else 0, int(idx.max()) + 1 if idx.size else 0, reason
        lo = int(shard[1]) * self.meta.shard_rows
        hi = lo + self.meta.shard_rows
        if entry is not None and "shard index" not in message:
            chunk = next(c for label, _, _, c in self.arrays() if label == array)
            lo += int(entry[1]) * chunk
            hi = lo + chunk
        return lo, min(hi, max(len(self), lo + 1)), reason

    def token_ids(self, idx=None) -> np.ndarray:
        return self._ids(self._token_ids, idx)

    def doc_ids(self, idx=None) -> np.ndarray:
        return self._ids(self._doc_ids, idx)

    def _ids(self, arr, idx) -> np.ndarray:
        name = "token_ids" if arr is self._token_ids else "doc_ids"
        if idx is None:
            with self._reading(name, np.array([0, max(0, len(self) - 1)])):
                return np.asarray(arr[: len(self)].read().result())
        idx = np.asarray(idx, np.int64).reshape(-1)
        self._check_indices(idx)
        with self._reading(name, idx):
            return _read_indexed(arr, idx)

    def arrays(self) -> list[tuple[str, str, ts.TensorStore, int]]:
        """(label, folder, handle, rows per inner chunk) of every array, for verification."""
        ids_chunk = min(1024, self.meta.shard_rows)
        return ([(f"layer {k}", f"layer_{k}", self._acts[k], self.meta.chunk_rows)
                 for k in self.meta.layers]
                + [("token_ids", "token_ids", self._token_ids, ids_chunk),
                   ("doc_ids", "doc_ids", self._doc_ids, ids_chunk)])

    # ----------------------------------------------------------------- summary
    def size_on_disk(self) -> int | None:
        """Bytes under a local store directory; None for remote kvstores."""
        if "://" in self.url and not self.url.startswith("file://"):
            return None
        root = self.url.removeprefix("file://")
        return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs)

    def info(self) -> dict:
        out = {"url": self.url, "rows": len(self), **dataclasses.asdict(self.meta),
               "cursor": self.cursor, "size_on_disk_bytes": self.size_on_disk(),
               "checksums": self.checksums()}
        out["stats"] = {k: moments_summary(self.moments(k)) for k in self.meta.layers}
        return out


class PendingRead:
    """A read in flight; `result()` gives the rows or the one-line StoreError."""

    def __init__(self, store: ActivationStore, array: str, start: int, stop: int, future):
        self._store, self._array, self._span, self._future = store, array, (start, stop), future

    def result(self) -> np.ndarray:
        a, b = self._span
        with self._store._reading(self._array, np.array([a, max(a, b - 1)])):
            return np.asarray(self._future.result())


def _refuse_file(url: str) -> None:
    if "://" not in str(url) and os.path.lexists(url) and not os.path.isdir(url):
        raise StoreError(f"{url} exists and is not a folder; a store is a folder: pass a "
                         f"new path (or an existing store folder) to --out")


def _holds_store(url: str) -> bool:
    """True if `url` holds anything at all (so create() must not write over it)."""
    from glp_jax.lock import LOCK_KEY

    if "://" not in str(url):
        return os.path.isdir(url) and bool(set(os.listdir(url)) - {LOCK_KEY})
    kv = ts.KvStore.open(kvstore_spec(url), context=_context_for(url)).result()
    return bool({k.decode() for k in kv.list().result()} - {LOCK_KEY})


def _read_indexed(arr, idx: np.ndarray) -> np.ndarray:
    """One tensorstore read of rows `idx` (any order, repeats allowed), in idx order."""
    if idx.size and (np.diff(idx) > 0).all():  # already sorted and unique: no reorder copy
        return np.asarray(arr.oindex[idx].read().result())
    uniq, inverse = np.unique(idx, return_inverse=True)  # sorted reads are much faster
    return np.asarray(arr.oindex[uniq].read().result())[inverse]
