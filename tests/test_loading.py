"""The embedded model: its pinned architecture is the GGUF's, and its one-time conversion
prints two plain lines (no carriage-return bars) when stderr is not a terminal."""

import io
import os

import pytest

from glp_jax.llm.loading import (
    EMBEDDED_ARCH,
    embedded_gguf_path,
    load_config,
    model_id_of,
    resolve_model,
)
from glp_jax.progress import THIRD_PARTY_BAR_SWITCHES, quiet_third_party_bars


def test_pinned_architecture_is_the_gguf_header_and_the_converted_config(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    header = load_gguf_checkpoint(str(embedded_gguf_path()), return_tensors=False)["config"]
    assert {k: header[k] for k in EMBEDDED_ARCH} == EMBEDDED_ARCH
    converted = smollm2.model.config
    assert {k: getattr(converted, k) for k in EMBEDDED_ARCH} == EMBEDDED_ARCH
    shape = load_config("smollm2")
    assert (shape.num_hidden_layers, shape.hidden_size) == (smollm2.n_layers, smollm2.d)
    assert model_id_of("smollm2") == resolve_model("smollm2")[1] == smollm2.model_id


def test_config_and_model_id_need_no_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("GLP_JAX_CACHE", str(tmp_path / "cold"))
    assert load_config("smollm2").hidden_size == 576
    assert model_id_of("smollm2").startswith("smollm2:")
    assert not (tmp_path / "cold").exists()


def test_conversion_prints_two_plain_lines(embedded_conversion):
    if embedded_conversion is None:
        pytest.skip("the model cache was warm; CI starts from a cold one (.ci/run)")
    assert "\r" not in embedded_conversion
    lines = embedded_conversion.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("glp: converting the embedded SmolLM2 GGUF once")
    assert lines[1].startswith("glp: converted the embedded model in ")


def test_third_party_bars_off_in_logs_only(monkeypatch):
    for name in THIRD_PARTY_BAR_SWITCHES:  # set, then removed: monkeypatch restores either way
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not quiet_third_party_bars(Terminal())
    assert all(name not in os.environ for name in THIRD_PARTY_BAR_SWITCHES)
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    try:
        assert quiet_third_party_bars(io.StringIO())
        assert all(os.environ[name] == "1" for name in THIRD_PARTY_BAR_SWITCHES)
        assert hub_utils.are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    finally:
        for name in THIRD_PARTY_BAR_SWITCHES:
            os.environ.pop(name, None)
        hub_utils.enable_progress_bars()
        hf_logging.enable_progress_bar()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice is kept
    assert not quiet_third_party_bars(io.StringIO())
