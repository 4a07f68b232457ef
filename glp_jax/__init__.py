"""glp_jax: generative meta-models of LLM activations in JAX."""

from glp_jax.version import __version__

__all__ = ["__version__", "load"]


def load(run_dir, step="latest"):
    """A trained GLP (ours or the original release's layout) ready to sample/project/encode."""
    from glp_jax.api import load as _load

    return _load(run_dir, step)
