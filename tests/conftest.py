"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) on the embedded SmolLM2 model."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One JAX compilation cache per test session, empty at its start and shared with every
# subprocess the tests start (`glp train` runs of the same tiny shapes compile once): set
# before anything imports jax. It roughly halves the multi-process tests' time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILE_CACHE = tempfile.mkdtemp(prefix="glp-test-xla-cache-")
    atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def embedded_conversion():
    """Converts the embedded GGUF once per session when the model cache is cold (CI's is:
    .ci/run gives the suite a fresh GLP_JAX_CACHE), before any test or subprocess needs it,
    so a test that only passes on a warm cache fails. Returns what the conversion printed
    to stderr, or None when the cache was already warm."""
    import contextlib
    import io

    from glp_jax.llm.loading import EMBEDDED_REVISION, cache_dir, embedded_model_dir

    if (cache_dir() / "models" / EMBEDDED_REVISION / "config.json").exists():
        return None
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        embedded_model_dir()
    return err.getvalue()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from its GGUF once, then cached)."""
    from glp_jax.llm.loading import load_causal_lm

    return load_causal_lm("smollm2")


def tiny_train_val(root, sizes: dict[str, int], d: int = 8):
    """Small stores under root (e.g. {"train": 2048, "val": 128}): correlated Gaussian rows
    with a shifted mean, layer 0, shards of 512 rows. Returns root."""
    import numpy as np

    from glp_jax.data.store import ActivationStore, StoreMeta

    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        s = ActivationStore.create(root / name, StoreMeta(model="m", layers=[0], d=d,
                                                          shard_rows=512))
        x = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 1).astype(np.float32)
        s.append({0: x}, np.zeros(n), np.zeros(n))
    return root
