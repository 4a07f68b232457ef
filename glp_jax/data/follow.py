"""Follow mode: training batches from a store that an extraction is still appending to.

Separate from the grain path (`pipeline.py`) because the row count grows while it reads:
rows are consumed in fixed blocks once committed, so every process and a restore agree.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grain
import numpy as np

from glp_jax.data.shuffle import index_shuffle
from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError, StoreError
from glp_jax.layers import split_examples

if TYPE_CHECKING:
    from glp_jax.data.pipeline import Pipeline, PipelineConfig, _Reader


def _no_more_rows(store: ActivationStore) -> bool:
    """The writer is done: the corpus ended, or it reached its --max-tokens target."""
    cur = store.cursor
    return bool(cur.get("exhausted") or cur.get("target_reached"))


def wait_for_block(store: ActivationStore, need: int, cfg: PipelineConfig, what: str) -> int:
    """Wait until `need` rows are committed; returns min(need, rows). Returns fewer only
    once the extraction has marked the store exhausted; raises after `follow_timeout_s`
    without any new commit."""
    last_seq, last_change = store.commit_seq, time.monotonic()
    while True:
        rows = store.refresh()
        if rows >= need or _no_more_rows(store):
            return min(need, rows)
        if store.commit_seq != last_seq:
            last_seq, last_change = store.commit_seq, time.monotonic()
        elif time.monotonic() - last_change > cfg.follow_timeout_s:
            raise StoreError(
                f"follow mode: waited {cfg.follow_timeout_s:g}s for store {store.url} to reach "
                f"{need} committed rows ({what}); it holds {rows} and nothing new was committed. "
                f"Is the extraction still running? Raise follow_timeout_s, or train on the rows "
                f"already there with mode=single or mode=repeat.")
        time.sleep(cfg.follow_poll_s)


class FollowIterator(grain.DatasetIterator):
    """Batches from a store that is still being appended to; each committed row once.

    Rows are consumed in blocks of R = follow_block_batches * batch_size rows: block k is
    rows [k*R, (k+1)*R), used once all of it is committed, its (row, layer) pairs shuffled
    with grain's permutation (seed + k) and split into global batches like the grain path
    (so processes agree without talking). When the extraction marks the store exhausted,
    the last partial block is used in whole global batches and iteration stops. Rows past
    the committed count are never read. The normaliser is the float64 moments of block 0
    (like the original, which froze the first shard's statistics), identical on every
    process and after a restore. State: {"block", "batch"} plus a fingerprint of the
    settings; a grain.checkpoint.CheckpointSave/Restore saves it like any grain iterator.
    """

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self._p = pipeline
        self._store = pipeline.stores[0]
        self._block = 0
        self._batch = 0
        self._block_size: int | None = None  # rows in the current block once known
        self._reader: _Reader | None = None
        self._done = False

    def _fingerprint(self) -> dict:
        p = self._p
        return {"seed": p.cfg.seed, "global_batch_size": p.global_batch_size,
                "process_index": p.process_index, "process_count": p.process_count,
                "block_rows": p.follow_block_rows, "layers": list(p.layers), "url": p.cfg.urls[0]}

    def get_state(self) -> dict:
        return {"block": self._block, "batch": self._batch, **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        mine = self._fingerprint()
        diffs = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diffs:
            raise ConfigError(f"follow iterator state was saved with other settings "
                              f"(saved, now): {diffs}; rebuild the pipeline with the saved ones")
        self._block, self._batch = int(state["block"]), int(state["batch"])
        self._block_size, self._done = None, False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("iterator is closed")
        if self._done:
            raise StopIteration
        p, nl = self._p, len(self._p.layers)
        if self._reader is None:
            self._reader = p.reader(share_stores=True)  # waits for block 0 (statistics)
        big_r = p.follow_block_rows
        lo = self._block * big_r
        if self._block_size is None:
            got = wait_for_block(self._store, lo + big_r, p.cfg, f"block {self._block}")
            self._block_size = max(0, got - lo)
        size = self._block_size
        batches = size * nl // p.global_batch_size  # < follow_block_batches * nl only at the end
        if self._batch >= batches:
            self._done = True
            raise StopIteration
        start = self._batch * p.global_batch_size + p.process_index * p.local_batch_size
        pos = np.arange(start, start + p.local_batch_size, dtype=np.int64)
        ex = index_shuffle(pos, size * nl - 1, (p.cfg.seed + self._block) % 2**32)
        rows, lpos = split_examples(ex, size, nl)
        out = self._reader.read(lo + rows, lpos)
        self._batch += 1
        if self._batch == batches and size == big_r:
            self._block, self._batch, self._block_size = self._block + 1, 0, None
        return out

    def close(self) -> None:
        self._closed = True
