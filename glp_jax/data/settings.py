"""Data settings shared by the library-level `PipelineConfig` and the run-level `TrainConfig`:
one default and one check for each, so the two configs cannot drift apart."""

from __future__ import annotations

from glp_jax.errors import ConfigError

MODES = ("single", "repeat", "follow")
BATCH_SIZE = 4096  # global batch, summed over processes (the original recipe)
FOLLOW_TIMEOUT_S = 600.0  # follow mode: give up after this long without a new commit
SHUFFLE_MODES = ("exact", "block")
BLOCK_ROWS = 1024  # block shuffle: consecutive examples per read (BENCHMARKS.md, input)
STREAMS = 8  # block shuffle: streams per global batch (a multiple of the process count)
WINDOW_ROWS = 16384  # block shuffle: rows per stream shuffled in memory at once


def check_mode(mode: str, key: str = "mode") -> None:
    if mode not in MODES:
        raise ConfigError(f"{key} {mode!r} unknown; use one of {', '.join(MODES)}")


def check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")


def check_shuffle_mode(mode: str, key: str = "shuffle_mode") -> None:
    if mode not in SHUFFLE_MODES:
        raise ConfigError(f"{key} {mode!r} unknown; use one of {', '.join(SHUFFLE_MODES)}")
