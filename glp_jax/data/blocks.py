"""Block-window shuffle: training batches from large contiguous reads.

The exact global shuffle reads every batch as thousands of random inner chunks, ~0.1 of
what the storage delivers. This plan reads whole blocks of consecutive examples instead and
shuffles them in memory, keeping every property the trainer relies on:

  examples  [0, E), E = n_layers x rows; example e = row e % rows of layer position
            e // rows (`glp_jax.layers.split_examples`), as in the exact plan.
  blocks    `block_rows` consecutive examples (the last block may be short).
  epoch     the blocks in a seeded random order (seed, epoch), laid end to end: a sequence
            of E examples, cut into `streams` equal streams (E mod streams dropped).
  windows   each stream in windows of `window_rows`; a window is read as its few whole
            blocks (contiguous reads) and permuted uniformly in memory
            (seed, epoch, stream, window).
  batch j   for each stream in order, its positions [j*b, (j+1)*b), b = batch / streams.

Process i of n owns streams [i*S/n, (i+1)*S/n): it reads only their blocks, and its local
batch is the concatenation of their slices. The global batch, the order of batches and the
point a checkpoint resumes from are therefore the same for any number of processes that
divides `streams`. Per epoch every example is used at most once; the unused ones number
(E mod S) + S * ((E // S) mod b) < batch + S (the exact plan: < batch).

Statistical cost: a batch's rows come from S windows of window_rows / block_rows blocks each,
instead of from everywhere; BENCHMARKS.md measures what that does to rows sharing a document
and to held-out loss.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from glp_jax.errors import ConfigError


@functools.lru_cache(maxsize=4)
def _block_layout(seed: int, examples: int, block_rows: int, epoch: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block order, block lengths in that order, their cumulative sum from 0) of an epoch."""
    n_blocks = -(-examples // block_rows)
    order = np.random.default_rng([seed, epoch, 0xB10C]).permutation(n_blocks)
    lens = np.minimum(block_rows, examples - order.astype(np.int64) * block_rows)
    return order, lens, np.concatenate([[0], np.cumsum(lens)])


@dataclass(frozen=True)
class BlockPlan:
    examples: int  # E
    block_rows: int
    streams: int  # S
    window_rows: int  # W, per stream
    stream_batch: int  # b = global batch / S
    seed: int

    def __post_init__(self):
        for name in ("block_rows", "streams", "window_rows", "stream_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"block shuffle: {name} must be positive, got "
                                  f"{getattr(self, name)}")
        if self.batches == 0:
            raise ConfigError(f"block shuffle: {self.examples} examples in {self.streams} "
                              f"streams give no batch of {self.stream_batch * self.streams}; "
                              f"lower batch_size or shuffle_streams, or extract more rows")

    @property
    def stream_len(self) -> int:
        return self.examples // self.streams

    @property
    def batches(self) -> int:
        """Global batches per epoch."""
        return self.stream_len // self.stream_batch

    @property
    def n_blocks(self) -> int:
        return -(-self.examples // self.block_rows)

    def shift(self, stream: int) -> int:
        """Stream s's windows start s * W / S rows early (the first one is short), so the
        streams' windows fall due at different batches, not all at once."""
        return stream * self.window_rows // self.streams

    def windows_per_stream(self, stream: int = 0) -> int:
        return -(-(self.stream_len + self.shift(stream)) // self.window_rows)

    def sequence_ranges(self, epoch: int, start: int, stop: int) -> list[tuple[int, int]]:
        """Example ranges [e0, e1) (each contiguous in the store) at sequence positions
        [start, stop) of `epoch`, in sequence order."""
        order, lens, cum = _block_layout(self.seed, self.examples, self.block_rows, epoch)
        k = int(np.searchsorted(cum, start, side="right")) - 1
        out, pos = [], start
        while pos < stop:
            e0 = int(order[k]) * self.block_rows + pos - int(cum[k])
            take = min(int(cum[k + 1]) - pos, stop - pos)
            out.append((e0, e0 + take))
            pos += take
            k += 1
        return out

    def window_span(self, stream: int, window: int) -> tuple[int, int]:
        """Sequence positions [start, stop) of a stream's window."""
        base, shift = stream * self.stream_len, self.shift(stream)
        start = max(0, window * self.window_rows - shift)
        return base + start, base + min((window + 1) * self.window_rows - shift, self.stream_len)

    def window_perm(self, epoch: int, stream: int, window: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, stream, window, 0x5EED]).permutation(n)

    def pieces(self, j: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        """(epoch, [(stream, window, o0, o1)]): where global batch j's rows lie, stream by
        stream, as slices [o0, o1) of permuted windows (a stream's slice spans at most a
        few windows)."""
        epoch, jj = divmod(int(j), self.batches)
        out = []
        for s in range(self.streams):
            p0, p1 = jj * self.stream_batch, (jj + 1) * self.stream_batch
            shift = self.shift(s)
            while p0 < p1:
                w = (p0 + shift) // self.window_rows
                start = max(0, w * self.window_rows - shift)
                take = min(p1 - p0, (w + 1) * self.window_rows - shift - p0)
                out.append((s, w, p0 - start, p0 - start + take))
                p0 += take
        return epoch, out

    def examples_of(self, j: int, streams: range | None = None) -> np.ndarray:
        """Example ids of global batch j (of `streams` only): the reference the loader must
        match, computed without reading (tests, statistics)."""
        epoch, pieces = self.pieces(j)
        parts = []
        for s, w, o0, o1 in pieces:
            if streams is not None and s not in streams:
                continue
            ex = self.window_examples(epoch, s, w)
            parts.append(ex[o0:o1])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def window_examples(self, epoch: int, stream: int, window: int) -> np.ndarray:
        """Example ids of a window, in its permuted (batch) order."""
        a, b = self.window_span(stream, window)
        ex = np.concatenate([np.arange(e0, e1, dtype=np.int64)
                             for e0, e1 in self.sequence_ranges(epoch, a, b)])
        return ex[self.window_perm(epoch, stream, window, ex.size)]


class WindowCache:
    """Loaded windows of some streams, each read once, the next one read ahead.

    `start(epoch, stream, window)` issues the reads of a window and returns an object whose
    `finish()` waits for them and returns the permuted window; `get` returns a finished
    window and has a background thread read and permute the one after it, so that work
    overlaps the batches of the current one.
    At most `keep` windows per stream stay in memory. Thread-safe (grain read threads)."""

    def __init__(self, plan: BlockPlan, start: Callable, keep: int = 2):
        self.plan, self._start, self.keep = plan, start, max(2, keep)
        self._entries: dict[tuple[int, int, int], _Entry] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _background(self) -> ThreadPoolExecutor:
        """One worker thread (joined at interpreter exit, never killed inside a read)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="glp-windows")
        return self._pool

    def _next(self, epoch: int, stream: int, window: int) -> tuple[int, int]:
        if window + 1 < self.plan.windows_per_stream(stream):
            return epoch, window + 1
        return epoch + 1, 0

    def get(self, epoch: int, stream: int, window: int):
        key = (stream, epoch, window)
        nxt = (stream, *self._next(epoch, stream, window))
        with self._lock:
            for k in (key, nxt):
                if k not in self._entries:
                    self._entries[k] = _Entry(self._start, k[1], k[0], k[2])
                    if k == nxt:  # read and finish it off the critical path
                        self._background().submit(self._entries[k].get)
            mine = sorted(k for k in self._entries if k[0] == stream)
            for k in mine[: max(0, len(mine) - self.keep)]:
                if k not in (key, nxt) and k < key:
                    del self._entries[k]
            entry = self._entries[key]
        return entry.get()


class _Entry:
    def __init__(self, start: Callable, epoch: int, stream: int, window: int):
        self._pending = start(epoch, stream, window)
        self._value = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._value is None:
                self._value = self._pending.finish()
                self._pending = None
            return self._value


def same_document_pair_fraction(doc_ids: np.ndarray) -> float:
    """Fraction of a batch's unordered row pairs that come from the same document: what a
    block shuffle raises above a uniform shuffle (BENCHMARKS.md)."""
    doc_ids = np.asarray(doc_ids).reshape(-1)
    n = doc_ids.size
    if n < 2:
        return 0.0
    _, counts = np.unique(doc_ids, return_counts=True)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))
