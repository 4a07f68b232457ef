"""Many extraction workers, one logical store.

Layout under the logical root (a local path or any kvstore URL):

    glp_workers.json                 the worker count, the block size and the identity that
                                     every worker must match (model, layers, d, corpus, ...)
    worker-00000-of-00004/ ...       one complete ActivationStore per worker, with its own
                                     writer lock, commit record and resume cursor

Worker w of N extracts the split documents i with i % N == w (`WorkerShard`), in the
usual deterministic windows, and stores their split index in `doc_ids`. `--max-tokens` is
the logical total: worker w stores max_tokens // N rows, plus one if w < max_tokens % N.
Each worker resumes on its own after kill -9 or a preemption; a second process claiming
the same worker id is refused by that sub-store's lock.

Row order (what `MultiWorkerStore` serves): the workers' rows are interleaved in blocks of
`block_rows` rows: round r holds block r of worker 0, then of worker 1, ..., skipping
workers that finished with fewer blocks; a finished worker's last block may be short.
Blocks keep reads contiguous (block_rows defaults to the shard size) and let a follower
(`data_mode=follow`) train at the speed of all workers together.

What a reader sees while workers are at different progress: the longest prefix of that
order whose every row is committed and whose place is final, i.e. it stops at the first
block of a worker that is still running and has not committed the whole block. Rows past
it (a fast worker's lead) become visible once the slower workers catch up; the visible
prefix only grows, and a row keeps its logical index once visible. Statistics are the
float64 moments of exactly the visible rows (Chan-merged per worker; a worker that is ahead
contributes the moments of its visible prefix, read back from its rows). When every worker
has finished, the visible rows are all rows. Growing a finished store (a larger
--max-tokens) moves the rows after the first finished worker's last block: reopen readers.

The view's rows are deterministic for a given worker count; a different N selects other
documents per window, so its rows equal a 1-worker store's only up to batching (fp32
summation order, then bf16 rounding).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from glp_jax.data.stats import Moments
from glp_jax.data.store import (
    DTYPES,
    IDENTITY_FIELDS,
    ActivationStore,
    LayerStats,
    StoreMeta,
    moments_summary,
)
from glp_jax.errors import GLPError, StoreError, WriterLockedError
from glp_jax.kv import open_kvstore

MANIFEST_KEY = "glp_workers.json"
FORMAT = "glp_jax.multi_worker_store"
DEFAULT_BLOCK_ROWS = 16384  # = the default shard_rows: one block, one shard read
_STATS_CHUNK = 65536


def worker_dir(worker: int, workers: int) -> str:
    return f"worker-{worker:05d}-of-{workers:05d}"


def _join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


def worker_share(max_tokens: int, worker: int, workers: int) -> int:
    """Rows worker `worker` stores so that the shares sum to `max_tokens` exactly."""
    return max_tokens // workers + (1 if worker < max_tokens % workers else 0)


def worker_meta(meta: StoreMeta, worker: int, workers: int) -> StoreMeta:
    """A sub-store's identity: the logical one plus its worker id (a sub-store of another
    worker or worker count is then refused like any mismatched store)."""
    return dataclasses.replace(meta, extra={**meta.extra, "worker": worker, "workers": workers})


def read_manifest(root: str) -> dict | None:
    """The manifest of a multi-worker root, or None when `root` holds none."""
    if "://" not in str(root) and not os.path.isdir(root):
        return None
    raw = open_kvstore(root).read(MANIFEST_KEY).result()
    if raw.state != "value":
        return None
    try:
        obj = json.loads(raw.value)
    except json.JSONDecodeError as e:
        raise StoreError(f"{root}/{MANIFEST_KEY} is corrupt ({e})") from e
    if obj.get("format") != FORMAT:
        raise StoreError(f"{root}/{MANIFEST_KEY} is not a glp_jax worker manifest")
    return obj


def is_multi_root(url: str) -> bool:
    return read_manifest(url) is not None


def _manifest(meta: StoreMeta, workers: int, block_rows: int) -> dict:
    ident = {k: v for k, v in dataclasses.asdict(meta).items() if k in IDENTITY_FIELDS}
    return {"format": FORMAT, "workers": workers, "block_rows": block_rows,
            "meta": {**meta.to_json(), **ident}}


def _check_manifest(root: str, found: dict, want: dict) -> None:
    diffs = [f"{k}: root has {found[k]!r}, this worker asks {want[k]!r}"
             for k in ("workers", "block_rows") if found[k] != want[k]]
    diffs += [f"{k}: root has {found['meta'].get(k)!r}, this worker asks {want['meta'][k]!r}"
              for k in IDENTITY_FIELDS if found["meta"].get(k) != want["meta"][k]]
    if diffs:
        raise StoreError(f"mismatched worker settings for {root}: " + "; ".join(diffs)
                         + ". Run every worker with the same settings (--workers, model, "
                         "layers, corpus, ...), or use a new --out")


def ensure_manifest(root: str, meta: StoreMeta, workers: int, block_rows: int) -> dict:
    """Write the root's manifest if absent (a conditional write: of racing workers one
    wins), else check this worker's settings against it. Refuses a plain store root."""
    want = _manifest(meta, workers, block_rows)
    if "://" not in str(root):
        if os.path.lexists(root) and not os.path.isdir(root):
            raise StoreError(f"{root} exists and is not a folder; pass a new --out")
        os.makedirs(root, exist_ok=True)
    kv = open_kvstore(root)
    if kv.read("glp_store.json").result().state == "value":
        raise StoreError(f"{root} holds a single-worker store; many workers need their own "
                         f"root: pass a new --out (or drop --workers to extend that store)")
    for _ in range(4):
        found = kv.read(MANIFEST_KEY).result()
        if found.state == "value":
            _check_manifest(root, json.loads(found.value), want)
            return want
        data = json.dumps(want, indent=1).encode()
        if kv.write(MANIFEST_KEY, data, if_equal=found.stamp.generation).result().generation:
            return want
    raise StoreError(f"{root}: could not write {MANIFEST_KEY}; retry")


def open_worker_for_writing(root: str, meta: StoreMeta, worker: int, workers: int,
                            block_rows: int = DEFAULT_BLOCK_ROWS,
                            what: str = "glp extract") -> ActivationStore:
    """Worker `worker`'s sub-store under `root`, held with its own writer lock."""
    if workers < 1 or not 0 <= worker < workers:
        raise GLPError(f"--worker {worker} is not in [0, --workers {workers}); number the "
                       f"workers 0..{workers - 1}")
    if block_rows < 1:
        raise GLPError(f"block_rows must be positive, got {block_rows}")
    ensure_manifest(root, meta, workers, block_rows)
    url = _join(root, worker_dir(worker, workers))
    try:
        return ActivationStore.open_for_writing(url, worker_meta(meta, worker, workers),
                                                f"{what} worker {worker}/{workers}")
    except WriterLockedError as e:
        raise WriterLockedError(f"worker {worker} of {root} is already running (overlapping "
                                f"worker ids: give each process its own --worker): {e}") from None


def layout(rows: list[int], done: list[bool], block_rows: int) -> np.ndarray:
    """Segments [logical start, worker, worker start, length] of the visible prefix (see
    the module docstring): round-robin blocks, stopping at the first block whose place or
    rows are not final yet."""
    segs, start, r = [], 0, 0
    while True:
        added = False
        for w, (n, fin) in enumerate(zip(rows, done, strict=True)):
            have = n - r * block_rows
            if have >= block_rows or (fin and have > 0):
                length = min(have, block_rows)
                segs.append((start, w, r * block_rows, length))
                start += length
                added = True
            elif not fin:  # still running: its next block (and its place) is not final
                return np.asarray(segs, np.int64).reshape(-1, 4)
        if not added:
            return np.asarray(segs, np.int64).reshape(-1, 4)
        r += 1


def _finished(store: ActivationStore | None) -> bool:
    cur = store.cursor if store is not None else {}
    return bool(cur.get("exhausted") or cur.get("target_reached"))


class _PendingParts:
    """Several sub-store reads in flight; `result()` concatenates them in order."""

    def __init__(self, parts):
        self._parts = parts

    def result(self) -> np.ndarray:
        return np.concatenate([p.result() for p in self._parts])


class MultiWorkerStore(LayerStats):
    """Read-only view of a multi-worker root with the ActivationStore reading interface
    (`ActivationStore.open` returns one for such a root)."""

    def __init__(self, url: str, manifest: dict):
        self.url = str(url)
        self.workers = int(manifest["workers"])
        self.block_rows = int(manifest["block_rows"])
        self.meta = StoreMeta.from_json(manifest["meta"])
        self._subs: list[ActivationStore | None] = [None] * self.workers
        self._stats: dict[tuple[int, int, int], Moments] = {}
        self.refresh()

    @classmethod
    def open(cls, url: str) -> MultiWorkerStore:
        manifest = read_manifest(url)
        if manifest is None:
            raise StoreError(f"{url} is not a multi-worker store (no {MANIFEST_KEY})")
        return cls(url, manifest)

    # ----------------------------------------------------------------- progress
    def _open_sub(self, w: int) -> ActivationStore | None:
        url = _join(self.url, worker_dir(w, self.workers))
        if "://" not in url and not os.path.exists(os.path.join(url, "glp_store.json")):
            return None  # not started yet
        try:
            sub = ActivationStore.open(url)
        except StoreError:
            if "://" in url:
                return None
            raise
        if sub.meta.extra.get("worker") != w or sub.meta.model != self.meta.model:
            raise StoreError(f"{url} is not worker {w} of this store (it holds worker "
                             f"{sub.meta.extra.get('worker')} of model {sub.meta.model}); "
                             f"move it away and rerun that worker")
        return sub

    def refresh(self) -> int:
        """Re-read every worker's commit record and recompute the visible prefix."""
        for w in range(self.workers):
            if self._subs[w] is None:
                self._subs[w] = self._open_sub(w)
            else:
                self._subs[w].refresh()
        rows = [len(s) if s is not None else 0 for s in self._subs]
        self._segs = layout(rows, [_finished(s) for s in self._subs], self.block_rows)
        self._starts = self._segs[:, 0]
        self._rows = int(self._segs[:, 3].sum()) if len(self._segs) else 0
        return self._rows

    def __len__(self) -> int:
        return self._rows

    def worker_progress(self) -> list[dict]:
        """Per worker: committed rows, rows visible in the logical order, finished."""
        vis = np.bincount(self._segs[:, 1], self._segs[:, 3], minlength=self.workers)
        return [{"worker": w, "rows": len(s) if s is not None else 0, "visible": int(vis[w]),
                 "finished": _finished(s), "started": s is not None}
                for w, s in enumerate(self._subs)]

    @property
    def cursor(self) -> dict:
        """What a follower asks: no more rows come once every worker has finished."""
        subs = self._subs
        return {"workers": self.workers,
                "exhausted": all(s is not None and s.cursor.get("exhausted") for s in subs),
                "target_reached": all(_finished(s) for s in subs)}

    @property
    def commit_seq(self) -> int:
        return sum(s.commit_seq for s in self._subs if s is not None)

    def close(self) -> None:
        """Readers hold no lock; present for the ActivationStore interface."""

    def __enter__(self) -> MultiWorkerStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- statistics
    def _visible(self) -> np.ndarray:
        return np.bincount(self._segs[:, 1], self._segs[:, 3], minlength=self.workers)

    def moments(self, layer: int | None = None) -> Moments:
        """Float64 moments of exactly the visible rows, merged over workers in order."""
        k = self._layer(layer)
        mo = Moments.zeros((self.d,))
        for w, v in enumerate(self._visible()):
            sub, v = self._subs[w], int(v)
            if v == 0:
                continue
            if v == len(sub):
                mo = mo.merge(sub.moments(k))
                continue
            key = (k, w, v)
            if key not in self._stats:
                part = Moments.zeros((self.d,))
                for a in range(0, v, _STATS_CHUNK):
                    part = part.merge(Moments.of(sub.read_raw(a, min(a + _STATS_CHUNK, v), k)))
                self._stats[key] = part
            mo = mo.merge(self._stats[key])
        return mo

    def committed_moments(self, layer: int | None = None) -> Moments:
        """Moments of every committed row, visible or not (cheap: commit records only)."""
        mo = Moments.zeros((self.d,))
        for s in self._subs:
            if s is not None:
                mo = mo.merge(s.moments(self._layer(layer)))
        return mo

    # ----------------------------------------------------------------- reading
    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(worker, row in that worker's store) of logical rows `idx`."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)}) of store {self.url}")
        s = np.searchsorted(self._starts, idx, side="right") - 1
        seg = self._segs[s]
        return seg[:, 1], seg[:, 2] + idx - seg[:, 0]

    def _gather(self, idx, read) -> np.ndarray | None:
        """Rows `idx` in idx order: one read per worker (`read(sub, local_rows)`)."""
        workers, local = self.locate(idx)
        out = None
        for w in np.unique(workers):
            sel = np.flatnonzero(workers == w)
            part = read(self._subs[int(w)], local[sel])
            if out is None:
                out = np.empty((len(workers), *part.shape[1:]), part.dtype)
            out[sel] = part
        return out

    def read_rows(self, idx, layer: int | None = None) -> np.ndarray:
        k = self._layer(layer)
        out = self._gather(idx, lambda s, r: s.read_rows(r, k))
        return np.zeros((0, self.d), np.float32) if out is None else out

    def _pieces(self, start: int, stop: int):
        """(worker, local start, local stop) of the contiguous pieces of [start, stop)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"bad range [{start}, {stop}) for store of {len(self)} rows")
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            lo, w, wlo, n = (int(v) for v in self._segs[s])
            a = start - lo
            b = min(n, stop - lo)
            yield w, wlo + a, wlo + b
            start, s = lo + b, s + 1

    def read_raw(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        k, stop = self._layer(layer), min(stop, len(self))
        parts = [self._subs[w].read_raw(a, b, k) for w, a, b in self._pieces(start, stop)]
        return (np.concatenate(parts) if parts
                else np.zeros((0, self.d), DTYPES[self.meta.dtype]))

    def read_range(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        return self.read_raw(start, stop, layer).astype(np.float32, copy=False)

    def read_raw_future(self, start: int, stop: int, layer: int | None = None) -> _PendingParts:
        k = self._layer(layer)
        return _PendingParts([self._subs[w].read_raw_future(a, b, k)
                              for w, a, b in self._pieces(start, stop)] or
                             [_Empty(self.d)])

    def token_ids(self, idx=None) -> np.ndarray:
        return self._ids("token_ids", idx)

    def doc_ids(self, idx=None) -> np.ndarray:
        return self._ids("doc_ids", idx)

    def _ids(self, name: str, idx) -> np.ndarray:
        if idx is None:
            parts = [getattr(self._subs[w], name)(np.arange(a, b))
                     for w, a, b in self._pieces(0, len(self))]
            return np.concatenate(parts) if parts else np.zeros(0, np.int32)
        out = self._gather(idx, lambda s, r: getattr(s, name)(r))
        return np.zeros(0, np.int32) if out is None else out

    # ----------------------------------------------------------------- summary
    def checksums(self) -> str:
        kinds = {s.checksums() for s in self._subs if s is not None}
        return kinds.pop() if len(kinds) == 1 else "chunks+index" if not kinds else "index"

    def size_on_disk(self) -> int | None:
        sizes = [s.size_on_disk() for s in self._subs if s is not None]
        return None if any(v is None for v in sizes) else sum(sizes)

    def info(self) -> dict:
        out = {"url": self.url, "rows": len(self), **dataclasses.asdict(self.meta),
               "cursor": self.cursor, "size_on_disk_bytes": self.size_on_disk(),
               "checksums": self.checksums(), "workers": self.worker_progress(),
               "block_rows": self.block_rows,
               "committed_rows": sum(len(s) for s in self._subs if s is not None)}
        # every committed row: commit records, no reads
        out["stats"] = {k: moments_summary(self.committed_moments(k)) for k in self.meta.layers}
        return out

    def worker_urls(self) -> list[str]:
        return [_join(self.url, worker_dir(w, self.workers)) for w in range(self.workers)]


def verify_workers(url: str, progress: bool = True):
    """`glp store verify` of a multi-worker root: every worker's sub-store, one report
    whose damaged ranges name the worker and its own rows."""
    from glp_jax.data.verify import VerifyReport, verify_store

    view = MultiWorkerStore.open(url)
    report = VerifyReport(view.url, 0, view.checksums())
    for w, sub_url in enumerate(view.worker_urls()):
        if view._subs[w] is None:
            continue  # not started: nothing committed to check
        sub = verify_store(sub_url, progress)
        report.rows += sub.rows
        report.shards_read += sub.shards_read
        for dmg in sub.damage:
            report.damage.append(dataclasses.replace(dmg, array=f"worker {w} {dmg.array}"))
        report.stats.update({f"worker {w} {k}": v for k, v in sub.stats.items()})
    return report


class _Empty:
    def __init__(self, d: int):
        self._d = d

    def result(self) -> np.ndarray:
        return np.zeros((0, self._d), np.float32)


__all__ = ["MANIFEST_KEY", "MultiWorkerStore", "ensure_manifest", "is_multi_root", "layout",
           "open_worker_for_writing", "read_manifest", "verify_workers", "worker_dir", "worker_meta",
           "worker_share"]
