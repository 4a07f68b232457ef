"""Data settings shared by the library-level `PipelineConfig` and the run-level `TrainConfig`:
one default and one check for each, so the two configs cannot drift apart."""

from __future__ import annotations

from glp_jax.errors import ConfigError

MODES = ("single", "repeat", "follow")
BATCH_SIZE = 4096  # global batch, summed over processes (the original recipe)
FOLLOW_TIMEOUT_S = 600.0  # follow mode: give up after this long without a new commit


def check_mode(mode: str, key: str = "mode") -> None:
    if mode not in MODES:
        raise ConfigError(f"{key} {mode!r} unknown; use one of {', '.join(MODES)}")


def check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
