"""Row-chunked evaluation with few compiled shapes: every chunk has `chunk` rows (the last
zero-padded), or, for calls smaller than one chunk, the next power of two."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bucket(n: int, smallest: int = 64) -> int:
    """Next power of two >= n, at least `smallest`."""
    b = max(1, smallest)
    while b < n:
        b *= 2
    return b


def map_rows(fn: Callable[[np.ndarray, int], np.ndarray], rows_NxD, out_width: int,
             chunk: int) -> np.ndarray:
    """fn(chunk_rows, chunk_index) -> [chunk, out_width], applied over all rows (float32)."""
    rows = np.asarray(rows_NxD, np.float32)
    n = rows.shape[0]
    out = np.empty((n, out_width), np.float32)
    bs = chunk if n >= chunk else bucket(n, min(64, chunk))
    for i, start in enumerate(range(0, n, bs)):
        part = rows[start:start + bs]
        m = part.shape[0]
        if m < bs:
            part = np.concatenate([part, np.zeros((bs - m, rows.shape[1]), np.float32)])
        out[start:start + m] = np.asarray(fn(part, i))[:m]
    return out
