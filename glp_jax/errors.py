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
