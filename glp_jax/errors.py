"""Exceptions whose messages name the problem and the fix, and the one-line warning."""

import sys


class GLPError(Exception):
    """Base class for errors a user can act on."""


class StoreError(GLPError):
    """An activation store is missing, corrupt, or used incorrectly."""


class StoreMismatchError(StoreError):
    """An existing store was written with different settings (model, layer, d, ...)."""


class NonFiniteActivationError(StoreError):
    """NaN or Inf activations were offered to a store; nothing was written."""


class ConfigError(GLPError):
    """A configuration key or value is invalid."""


class CheckpointError(GLPError):
    """A checkpoint is missing, partial or incompatible."""


class CheckpointCorruptError(CheckpointError):
    """One checkpoint step cannot be used: a file differs from the digest written when it was
    saved (missing, truncated, altered), or orbax cannot restore it. `run`, `step` and
    `reason` (one line) say which and why; `verified` is True when the step's files did
    match their digest (orbax failed on intact files: not damage, another version)."""

    def __init__(self, message: str, run: str, step: int, reason: str, verified: bool = False):
        super().__init__(message)
        self.run, self.step, self.reason, self.verified = run, step, reason, verified


class WriterLockedError(GLPError):
    """Another live writer holds the store's or run's writer lock."""


class WriterLockLostError(GLPError):
    """This writer's lock was taken over (or could not be refreshed); it stops writing."""


def warn(msg: str) -> None:
    """One line on stderr: `glp: warning: {msg}` (readable in logs, no warnings machinery)."""
    print(f"glp: warning: {msg}", file=sys.stderr, flush=True)
