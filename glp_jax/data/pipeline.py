"""Input pipeline: ActivationStore rows -> shuffled, normalised, per-process batches.

Modes (`PipelineConfig.mode`):
  single  every row exactly once, in one global seeded shuffle; ends after
          floor(rows / batch_size) global batches (the remainder is dropped).
  repeat  endless; epoch e is a fresh global permutation (seed + e, as grain reseeds);
          every epoch drops its own remainder, so no batch straddles two epochs.
  follow  trains on a store that an extraction is still appending to (`follow.py`).

The single/repeat path is a grain `MapDataset` whose element j is local batch j:

    MapDataset.range(batches_per_epoch) [.repeat()] .map_with_index(_ReadBatch)
        .to_iter_dataset(ReadOptions(num_threads, prefetch)) [.mp_prefetch(workers)]

`_ReadBatch` computes the example ids of batch j (indices are batched before any data is
touched) and reads them with one tensorstore call per (store, layer), then z-scores them.

Shuffle: grain's `MapDataset.range(E).shuffle(seed)` permutation, global over all E
examples, reseeded seed+epoch each epoch, evaluated per batch in numpy (`shuffle.py`).

Snapshot: rows and statistics are those committed when the pipeline is built; rows that
are appended later are not used (except in follow mode). The trainer should save
`Pipeline.mean`/`Pipeline.std` with its checkpoints to denormalise samples.

Examples: with layers [l_0, ..., l_{n-1}] over stores holding T rows in all, example e is
(row e % T, layer position e // T) (`glp_jax.layers.split_examples`): a shuffle of the
(row, layer) product space. Rows of several stores are concatenated in the order given
(`Pipeline.offsets`).
A multi-worker extraction root (`glp_jax/data/multistore.py`) opens as one store: its
workers' rows in their fixed round-robin order, in follow mode too.

Batches are dicts of numpy arrays:
  "x"         float32 [B_local, d], z-scored per dimension with the float64 moments of the
              layer that row came from: (x - mean) / sqrt(max(var, min_var)), population var.
  "index"     int64 [B_local], the row in the concatenated stores (the store's row id when
              there is one store).
  "layer"     int32 [B_local], multi-layer only: position in `cfg.layers`; it indexes
              `Pipeline.mean` / `Pipeline.std` ([n_layers, d]).
  "llm_layer" int32 [B_local], multi-layer only: the LLM layer number `cfg.layers[layer]`
              (what the original code feeds its layer embedding as `layer_idx`).

Multi-host: process i of n gets rows [i*B/n, (i+1)*B/n) of every global batch of B rows,
so concatenating the processes' batches in process order gives the global batch.

Checkpointing: `Pipeline.make_iterator()` returns a grain `DatasetIterator`
(`get_state()` / `set_state()`; `FollowIterator` is one too). The trainer saves it with
orbax beside the model, from a pipeline rebuilt identically (config, process layout and
worker count) on restore:

    it = pipeline.make_iterator()
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))

Worker processes (`num_workers > 0`, grain `mp_prefetch`) use the spawn start method:
guard the script's `__main__`; the transforms pickle URLs and small arrays only and open
the stores lazily inside each worker (memory:// stores cannot cross processes). Their
arrays arrive in grain shared memory: drop (or copy) them, and close the iterator, before
the interpreter exits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grain
import numpy as np

from glp_jax.data.blocks import BlockPlan, WindowCache
from glp_jax.data.follow import FollowIterator, wait_for_block
from glp_jax.data.settings import (
    BATCH_SIZE,
    BLOCK_ROWS,
    FOLLOW_TIMEOUT_S,
    MODES,
    STREAMS,
    WINDOW_ROWS,
    check_batch_size,
    check_mode,
    check_shuffle_mode,
)
from glp_jax.data.shuffle import index_shuffle
from glp_jax.data.stats import Moments
from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError, StoreError, StoreMismatchError
from glp_jax.layers import split_examples

__all__ = ["MODES", "FollowIterator", "Pipeline", "PipelineConfig", "build_pipeline",
           "index_shuffle", "make_iterator", "std_from_var", "z_normalize"]
_STATS_CHUNK_ROWS = 65536


# ----------------------------------------------------------------------------- normalising
def z_normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per dimension, in float32."""
    out = np.array(x, np.float32)  # one pass from bf16, and never the caller's array
    out -= np.asarray(mean, np.float32)
    out /= np.asarray(std, np.float32)
    return out


def std_from_var(var: np.ndarray, min_var: float) -> np.ndarray:
    """Standard deviation with the variance clamped below at `min_var` (constant dims)."""
    return np.sqrt(np.maximum(np.asarray(var, np.float64), min_var))


# ----------------------------------------------------------------------------- config
@dataclass
class PipelineConfig:
    """How to turn one or several stores into training batches (see the module doc).

    The library-level object: its defaults suit a caller driving its own loop (an endless
    `repeat` iterator, 2 read threads). A training run is described by `TrainConfig`, whose
    `pipeline_config()` is the one translation to this; shared defaults and checks live in
    `glp_jax.data.settings`."""

    store: str | list[str] = ""  # url or list of urls; rows are concatenated in order
    layers: list[int] | None = None  # None: the store's only layer; >1 layer: mixing
    batch_size: int = BATCH_SIZE  # global batch, summed over processes
    seed: int = 0
    mode: str = "repeat"  # single | repeat | follow
    shuffle: bool = True  # False: rows in store order (eval passes, contiguous reads)
    shuffle_mode: str = "exact"  # exact: global index shuffle | block: blocks.py (fast reads)
    block_rows: int = BLOCK_ROWS  # block: consecutive examples per read
    streams: int = STREAMS  # block: independent streams per batch (a multiple of processes)
    window_rows: int = WINDOW_ROWS  # block: rows per stream shuffled in memory at once
    drop_remainder: bool = True  # False: a last short batch (single process only)
    num_threads: int = 2  # grain ReadOptions.num_threads (reads release the GIL)
    prefetch: int = 2  # batches buffered ahead per process
    num_workers: int = 0  # grain mp_prefetch worker processes; 0 = threads only
    min_var: float = 1e-6  # variance floor of the normaliser
    follow_block_batches: int = 16  # follow: rows are shuffled in blocks of this many batches
    follow_timeout_s: float = FOLLOW_TIMEOUT_S  # follow: give up after this long with no new commit
    follow_poll_s: float = 0.5  # follow: how often to re-read the store's commit

    @property
    def urls(self) -> list[str]:
        return [self.store] if isinstance(self.store, str) else [str(u) for u in self.store]

    def validate(self) -> None:
        if not self.urls or any(not u for u in self.urls):
            raise ConfigError("no store given: set store=<path or url> (or a list of them)")
        check_mode(self.mode)
        check_batch_size(self.batch_size)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("num_threads", "prefetch", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.min_var > 0:
            raise ConfigError(f"min_var must be positive, got {self.min_var}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ConfigError(f"layers must be a non-empty list of distinct ints, got {self.layers}")
        check_shuffle_mode(self.shuffle_mode)
        if self.mode == "follow":
            if len(self.urls) != 1:
                raise ConfigError(f"follow mode reads one store, got {len(self.urls)}: {self.urls}")
            if self.follow_block_batches <= 0 or self.follow_timeout_s <= 0 or self.follow_poll_s <= 0:
                raise ConfigError("follow_block_batches, follow_timeout_s and follow_poll_s must be "
                                  "positive")


# ----------------------------------------------------------------------------- reading
class _Reader:
    """Reads (row, layer position) pairs and z-scores them. Picklable: holds URLs and small
    arrays; opens the stores lazily, once per process (thread-safe)."""

    def __init__(self, urls: Sequence[str], layers: Sequence[int], offsets: np.ndarray,
                 mean: np.ndarray, std: np.ndarray, stores: list[ActivationStore] | None = None):
        self.urls = list(urls)
        self.layers = np.asarray(layers, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.mean32 = np.asarray(mean, np.float32)  # [n_layers, d]
        self.std32 = np.asarray(std, np.float32)
        self._stores = stores
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stores"] = None  # never pickle a tensorstore handle
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def stores(self) -> list[ActivationStore]:
        if self._stores is None:
            with self._lock:
                if self._stores is None:
                    self._stores = [ActivationStore.open(u) for u in self.urls]
        return self._stores

    def read(self, rows: np.ndarray, lpos: np.ndarray | None) -> dict[str, np.ndarray]:
        """`rows`: int64 rows of the concatenated stores; `lpos`: layer positions or None."""
        stores = self.stores()
        multi = len(self.layers) > 1
        if len(stores) == 1 and not multi:
            a = int(rows[0]) if rows.size else 0
            if rows.size > 1 and np.array_equal(rows, np.arange(a, a + rows.size)):
                x = stores[0].read_range(a, a + rows.size, int(self.layers[0]))  # shuffle=False
            else:
                x = stores[0].read_rows(rows, int(self.layers[0]))
            np.subtract(x, self.mean32[0], out=x)
            np.divide(x, self.std32[0], out=x)
        else:
            lp = np.zeros(rows.shape, np.int64) if lpos is None else lpos
            sid = (np.searchsorted(self.offsets, rows, side="right") - 1 if len(stores) > 1
                   else np.zeros(rows.shape, np.int64))  # follow mode: rows past offsets[-1]
            x = np.empty((rows.size, self.mean32.shape[1]), np.float32)
            group = sid * len(self.layers) + lp
            for g in np.unique(group):
                s, p = divmod(int(g), len(self.layers))
                sel = np.flatnonzero(group == g)
                part = stores[s].read_rows(rows[sel] - self.offsets[s], int(self.layers[p]))
                x[sel] = z_normalize(part, self.mean32[p], self.std32[p])
        out = {"x": x, "index": np.asarray(rows, np.int64)}
        if multi:
            out["layer"] = lp.astype(np.int32)
            out["llm_layer"] = self.layers[lp]
        return out


    def start_window(self, ranges: list[tuple[int, int]], rows_total: int,
                     perm: Callable[[int], np.ndarray]) -> _PendingWindow:
        """Issue the reads of example ranges [e0, e1) (block shuffle) in the stored dtype."""
        stores = self.stores()
        parts = []
        for e0, e1 in ranges:
            while e0 < e1:  # split at layer and store boundaries: one contiguous read each
                p, r0 = divmod(e0, rows_total)
                s = int(np.searchsorted(self.offsets, r0, side="right")) - 1
                r1 = min(r0 + (e1 - e0), rows_total, int(self.offsets[s + 1]))
                off = int(self.offsets[s])
                parts.append((p, r0, stores[s].read_raw_future(r0 - off, r1 - off,
                                                               int(self.layers[p]))))
                e0 += r1 - r0
        return _PendingWindow(parts, perm, len(self.layers) > 1)

    def normalize_(self, x: np.ndarray, lpos: np.ndarray | None) -> np.ndarray:
        """z-score float32 rows in place (each with its layer's statistics); returns x."""
        if lpos is None:
            x -= self.mean32[0]
            x /= self.std32[0]
            return x
        x -= self.mean32[lpos]
        x /= self.std32[lpos]
        return x


class _PendingWindow:
    """A block-shuffle window being read; `finish()` -> (raw rows in read order, their store
    rows, their layer positions or None, the window's permutation: batch order -> row).
    Batches gather, cast and z-score their rows in the read threads, which scale with
    `num_threads`; a window costs one read and no copy of its own."""

    def __init__(self, parts, perm: Callable[[int], np.ndarray], multi: bool):
        self.parts, self.perm, self.multi = parts, perm, multi

    def finish(self):
        raws = [f.result() for _, _, f in self.parts]
        raw = raws[0] if len(raws) == 1 else np.concatenate(raws)
        rows = np.concatenate([np.arange(r0, r0 + len(r), dtype=np.int64)
                               for (_, r0, _), r in zip(self.parts, raws, strict=True)])
        lpos = None
        if self.multi:
            lpos = np.concatenate([np.full(len(r), p, np.int32)
                                   for (p, _, _), r in zip(self.parts, raws, strict=True)])
        return raw, rows, lpos, self.perm(len(rows))


@dataclass(frozen=True)
class _Plan:
    """Which examples local batch j holds (single/repeat), as grain would batch them:
    `range(E).shuffle(seed).batch(L)[:batches * n][process_index::n].repeat()`."""

    examples: int  # E = n_layers * rows
    rows: int  # T
    global_batch: int
    local_batch: int
    process_index: int
    batches: int  # per epoch
    seed: int
    shuffle: bool

    def examples_of(self, j: int) -> np.ndarray:
        epoch, b = divmod(int(j), self.batches)
        start = b * self.global_batch + self.process_index * self.local_batch
        pos = np.arange(start, min(start + self.local_batch, self.examples), dtype=np.int64)
        if self.shuffle:
            pos = index_shuffle(pos, self.examples - 1, (self.seed + epoch) % 2**32)
        return pos


class _ReadBatch(grain.transforms.MapWithIndex):
    """grain transform: local batch number -> batch dict (one read per store and layer)."""

    def __init__(self, plan: _Plan, reader: _Reader):
        self.plan = plan
        self.reader = reader

    def map_with_index(self, index: int, element):
        del element  # the batch number is the index (epochs included under repeat)
        ex = self.plan.examples_of(index)
        return self.reader.read(*split_examples(ex, self.plan.rows, len(self.reader.layers)))


class _ReadBlockBatch(grain.transforms.MapWithIndex):
    """grain transform for the block shuffle: local batch number -> batch dict, sliced from
    this process's permuted windows (blocks.py), which are read whole and read ahead."""

    def __init__(self, plan: BlockPlan, reader: _Reader, rows: int, streams: range):
        self.plan, self.reader, self.rows, self.streams = plan, reader, rows, streams
        self._cache = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _start(self, epoch: int, stream: int, window: int) -> _PendingWindow:
        a, b = self.plan.window_span(stream, window)
        return self.reader.start_window(
            self.plan.sequence_ranges(epoch, a, b), self.rows,
            lambda n: self.plan.window_perm(epoch, stream, window, n))

    def cache(self) -> WindowCache:
        if self._cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = WindowCache(self.plan, self._start)
        return self._cache

    def map_with_index(self, index: int, element):
        del element
        epoch, pieces = self.plan.pieces(index)
        mine = [(self.cache().get(epoch, s, w), o0, o1) for s, w, o0, o1 in pieces
                if s in self.streams]
        x = np.empty((sum(o1 - o0 for _, o0, o1 in mine), self.reader.mean32.shape[1]),
                     np.float32)
        rows, lpos, a = [], [], 0
        for (raw, r, lp, order), o0, o1 in mine:
            idx = order[o0:o1]
            uint = np.dtype(f"u{raw.dtype.itemsize}")  # numpy moves bf16 rows ~2x slower
            x[a:a + len(idx)] = raw.view(uint)[idx].view(raw.dtype)  # gather, cast into x
            rows.append(r[idx])
            lpos.append(lp[idx] if lp is not None else None)
            a += len(idx)
        lp = None if lpos[0] is None else np.concatenate(lpos)
        out = {"x": self.reader.normalize_(x, lp), "index": np.concatenate(rows)}
        if lp is not None:
            out["layer"] = lp
            out["llm_layer"] = self.reader.layers[lp]
        return out


def _mark_absl_flags_parsed() -> None:
    """grain workers read an absl flag; outside absl.app.run it is unparsed (JAX_NOTES)."""
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - absl ships with grain
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    _mark_absl_flags_parsed()


# ----------------------------------------------------------------------------- pipeline
def _moments_of_rows(store: ActivationStore, layer: int, stop: int) -> Moments:
    """Float64 moments of rows [0, stop) of one layer, read in chunks."""
    mo = Moments.zeros((store.d,))
    for a in range(0, stop, _STATS_CHUNK_ROWS):
        mo = mo.merge(Moments.of(store.read_range(a, min(a + _STATS_CHUNK_ROWS, stop), layer)))
    return mo


@dataclass
class Pipeline:
    """A built pipeline: sizes, the normaliser, the grain dataset and its iterators."""

    cfg: PipelineConfig
    process_index: int
    process_count: int
    stores: list[ActivationStore]
    layers: list[int]
    d: int
    offsets: np.ndarray  # int64 [n_stores + 1]; rows of store s are offsets[s]:offsets[s+1]
    batches_per_epoch: int | None  # None in follow mode
    dataset: grain.MapDataset | None  # local batches (single/repeat); None in follow mode
    _mean: np.ndarray | None = None
    _std: np.ndarray | None = None
    transform: grain.transforms.MapWithIndex | None = None  # batch number -> batch dict
    _stats_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def global_batch_size(self) -> int:
        return self.cfg.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.cfg.batch_size // self.process_count

    @property
    def rows(self) -> int:
        """Rows the pipeline draws from (follow mode: rows committed right now)."""
        if self.cfg.mode == "follow":
            return len(self.stores[0])
        return int(self.offsets[-1])

    @property
    def mean(self) -> np.ndarray:
        """float64 [n_layers, d]. Follow mode: waits for the first block (see FollowIterator)."""
        self._ensure_stats()
        return self._mean

    @property
    def std(self) -> np.ndarray:
        """float64 [n_layers, d], sqrt(max(var, min_var)) with the population variance."""
        self._ensure_stats()
        return self._std

    def _ensure_stats(self) -> None:
        if self._mean is not None:
            return
        with self._stats_lock:
            if self._mean is None:  # follow mode: moments of the first block's rows
                store = self.stores[0]
                stop = wait_for_block(store, self.follow_block_rows, self.cfg, "statistics")
                mos = [_moments_of_rows(store, k, stop) for k in self.layers]
                self._std = np.stack([std_from_var(m.var, self.cfg.min_var) for m in mos])
                self._mean = np.stack([m.mean for m in mos])

    @property
    def follow_block_rows(self) -> int:
        """Rows per follow-mode shuffle block: whole global batches of (row, layer) pairs."""
        return self.cfg.follow_block_batches * self.cfg.batch_size

    def reader(self, share_stores: bool = False) -> _Reader:
        return _Reader(self.cfg.urls, self.layers, self.offsets, self.mean, self.std,
                       self.stores if share_stores else None)

    def make_iterator(self) -> grain.DatasetIterator:
        """A checkpointable iterator of batch dicts (see the module doc). Close it when done."""
        if self.cfg.mode == "follow":
            return FollowIterator(self)
        ds = self.dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=self.cfg.num_threads, prefetch_buffer_size=self.cfg.prefetch))
        if self.cfg.num_workers > 0:
            _mark_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.num_workers, per_worker_buffer_size=max(1, self.cfg.prefetch)),
                worker_init_fn=_worker_init)
        return iter(ds)

    def __iter__(self):
        return self.make_iterator()


def _check_stores(stores: list[ActivationStore], layers: list[int], mode: str) -> None:
    ref = stores[0]
    for s in stores[1:]:
        diffs = [f"{k}: {ref.url} has {getattr(ref.meta, k)!r}, {s.url} has {getattr(s.meta, k)!r}"
                 for k in ("model", "d", "hook") if getattr(ref.meta, k) != getattr(s.meta, k)]
        if diffs:
            raise StoreMismatchError("stores cannot be mixed in one pipeline: " + "; ".join(diffs)
                                     + ". Train on stores extracted from the same model and hook.")
    for s in stores:
        missing = [k for k in layers if k not in s.meta.layers]
        if missing:
            raise StoreError(f"store {s.url} has no layer(s) {missing} (it holds {s.meta.layers}); "
                             f"set layers= to a subset of those")
        if mode == "follow":
            continue
        if len(s) == 0:
            raise StoreError(f"store {s.url} has no committed rows; extract into it first, or use "
                             f"mode=follow to train while an extraction appends")
        for k in layers:
            mo = s.moments(k)
            if mo.count != len(s) or not np.isfinite(mo.var).all():
                raise StoreError(f"store {s.url} layer {k}: statistics cover {mo.count} of "
                                 f"{len(s)} rows (or are not finite); the store's commit is "
                                 f"inconsistent. Re-import or re-extract it.")


def build_pipeline(cfg: PipelineConfig, process_index: int | None = None,
                   process_count: int | None = None) -> Pipeline:
    """Open and check the stores, compute the normaliser and the per-process batch plan.

    `process_index`/`process_count` default to jax.process_index()/process_count()."""
    cfg.validate()
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {process_count} "
                          f"processes; use a multiple of {process_count}")
    if not cfg.drop_remainder and (process_count > 1 or cfg.mode == "follow"):
        raise ConfigError("drop_remainder=False needs a single process and mode single/repeat: "
                          "every process must get a batch of the same shape")
    stores = [ActivationStore.open(u) for u in cfg.urls]
    if cfg.layers is None:
        if len(stores[0].meta.layers) != 1:
            raise ConfigError(f"store {stores[0].url} holds layers {stores[0].meta.layers}; name "
                              f"the ones to train on with layers=[...] (several = mixing)")
        layers = list(stores[0].meta.layers)
    else:
        layers = [int(k) for k in cfg.layers]
    _check_stores(stores, layers, cfg.mode)
    d = stores[0].d
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in stores])]).astype(np.int64)
    if cfg.mode == "follow":
        return Pipeline(cfg, process_index, process_count, stores, layers, d, offsets, None, None)

    rows = int(offsets[-1])
    examples = rows * len(layers)
    if cfg.batch_size > examples:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {examples} examples "
                          f"({rows} rows x {len(layers)} layers) of {', '.join(cfg.urls)}; lower "
                          f"batch_size or extract more rows")
    batches = (examples // cfg.batch_size if cfg.drop_remainder
               else -(-examples // cfg.batch_size))
    mean, std = [], []
    for k in layers:  # float64 moments pooled over the stores (Chan merge, exact)
        mo = Moments.zeros((d,))
        for s in stores:
            mo = mo.merge(s.moments(k))
        mean.append(mo.mean)
        std.append(std_from_var(mo.var, cfg.min_var))
    block = cfg.shuffle and cfg.shuffle_mode == "block"
    if block:
        read = _block_reader(cfg, examples, rows, process_index, process_count)
        batches = read.plan.batches
    else:
        read = _ReadBatch(_Plan(examples, rows, cfg.batch_size, cfg.batch_size // process_count,
                                process_index, batches, cfg.seed, cfg.shuffle), None)
    pipe = Pipeline(cfg, process_index, process_count, stores, layers, d, offsets, batches, None,
                    np.stack(mean), np.stack(std))
    read.reader = pipe.reader(share_stores=True)
    pipe.transform = read
    ds = grain.MapDataset.range(batches)
    if cfg.mode == "repeat":
        ds = ds.repeat()
    pipe.dataset = ds.map_with_index(read)
    return pipe


def _block_reader(cfg: PipelineConfig, examples: int, rows: int, process_index: int,
                  process_count: int) -> _ReadBlockBatch:
    """The block-shuffle transform of this process (its streams; the reader is set later)."""
    if not cfg.drop_remainder:
        raise ConfigError("shuffle_mode=block always drops the remainder (drop_remainder=True)")
    if cfg.streams % process_count:
        raise ConfigError(f"shuffle_streams {cfg.streams} is not a multiple of the "
                          f"{process_count} processes; each process reads whole streams")
    if cfg.batch_size % cfg.streams:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by shuffle_streams "
                          f"{cfg.streams}")
    plan = BlockPlan(examples, cfg.block_rows, cfg.streams, cfg.window_rows,
                     cfg.batch_size // cfg.streams, cfg.seed)
    per = cfg.streams // process_count
    return _ReadBlockBatch(plan, None, rows, range(process_index * per, (process_index + 1) * per))


def make_iterator(cfg: PipelineConfig, process_index: int | None = None,
                  process_count: int | None = None) -> grain.DatasetIterator:
    """`build_pipeline(cfg, ...).make_iterator()`."""
    return build_pipeline(cfg, process_index, process_count).make_iterator()
