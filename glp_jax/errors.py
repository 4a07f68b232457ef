"""Exceptions whose messages name the problem and the fix."""


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
    """A checkpoint's files are truncated or altered (its digest or its restore failed)."""


class WriterLockedError(GLPError):
    """Another live writer holds the store's or run's writer lock."""


class WriterLockLostError(GLPError):
    """This writer's lock was taken over (or could not be refreshed); it stops writing."""


def warn(msg: str) -> None:
    """One `glp: warning:` line on stderr (readable in logs, no Python warning machinery)."""
    import sys

    print(f"glp: warning: {msg}", file=sys.stderr, flush=True)
