"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) on the embedded SmolLM2 model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from its GGUF once, then cached)."""
    from glp_jax.llm.loading import load_causal_lm

    return load_causal_lm("smollm2")
