"""glp_jax: generative meta-models of LLM activations in JAX."""

__version__ = "0.1.0"
