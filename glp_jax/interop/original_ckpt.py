"""Load and write GLP checkpoint folders in the original PyTorch release's layout.

    config.yaml                  glp_kwargs.denoiser_config {d_input, d_model, d_mlp,
                                 n_layers, multi_layer_n_layers}; other keys are ignored
                                 and `${...}` interpolations are kept as opaque strings
    rep_statistics.pt            torch pickle {"mean", "var"} fp32, [d] or [L, d]
    final.safetensors            weights, keys `model.*`, torch Linear layout [out, in]
    checkpoints/epoch_N.safetensors

`.pt` files are read only with `torch.load(weights_only=True)` and YAML only with
`yaml.safe_load`: a downloaded folder is untrusted data. The statistics always come from
the root rep_statistics.pt (as the original's `load_glp` does), also for epoch checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from glp_jax.errors import CheckpointError, ConfigError
from glp_jax.model import GLP, GLPConfig, Normalizer, abstract_glp
from glp_jax.version import __version__


class KeyMap(NamedTuple):
    """One torch tensor <-> (a slice of) one JAX param."""

    torch_key: str
    path: tuple[str, ...]   # attribute path of the nnx.Param inside GLP
    layer: int | None       # index along the stacked [n_layers] axis, None if unstacked
    transpose: bool         # torch Linear weight [out, in] <-> JAX kernel [in, out]


def _linear(torch_name: str, path: tuple[str, ...], layer: int | None = None) -> list[KeyMap]:
    return [KeyMap(f"{torch_name}.weight", (*path, "kernel"), layer, True),
            KeyMap(f"{torch_name}.bias", (*path, "bias"), layer, False)]


def _norm(torch_name: str, path: tuple[str, ...], layer: int | None = None) -> list[KeyMap]:
    return [KeyMap(f"{torch_name}.weight", (*path, "scale"), layer, False),
            KeyMap(f"{torch_name}.bias", (*path, "bias"), layer, False)]


def key_map(cfg: GLPConfig) -> list[KeyMap]:
    """Every safetensors key of the original layout (original_formats.md section 2b)."""
    keys = [*_linear("model.in_proj", ("in_proj",)), *_linear("model.out_proj", ("out_proj",)),
            *_linear("model.time_embed.0", ("time_embed", "fc1")),
            *_linear("model.time_embed.2", ("time_embed", "fc2")),
            *_norm("model.ln", ("ln",))]
    if cfg.is_multi_layer:
        keys += [*_linear("model.layer_embed.0", ("layer_embed", "fc1")),
                 *_linear("model.layer_embed.2", ("layer_embed", "fc2"))]
    for i in range(cfg.n_layers):
        keys += _norm(f"model.layers.{i}.ln", ("blocks", "ln"), i)
        for name in ("gate_proj", "time_proj", "up_proj", "down_proj"):
            keys += _linear(f"model.layers.{i}.{name}", ("blocks", name), i)
    return keys


def _variable(model: GLP, path: tuple[str, ...]):
    obj = model
    for name in path:
        obj = getattr(obj, name)
    return obj


# ---------------------------------------------------------------------------- reading


def read_config(folder: str | Path) -> GLPConfig:
    """GLPConfig from `config.yaml`'s glp_kwargs.denoiser_config."""
    import yaml

    from glp_jax.yamlio import safe_load

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: an original-format GLP folder needs "
                              "config.yaml, rep_statistics.pt and final.safetensors")
    try:
        obj = safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({e}); re-download or re-export "
                              "the folder") from None
    den = ((obj or {}).get("glp_kwargs") or {}).get("denoiser_config") \
        if isinstance(obj, dict) else None
    if not isinstance(den, dict):
        raise CheckpointError(f"{path} has no glp_kwargs.denoiser_config mapping; it is not "
                              "a GLP training config")
    try:
        return GLPConfig.from_dict(den)
    except ConfigError as e:
        raise CheckpointError(f"{path}: glp_kwargs.denoiser_config is unusable: {e}. Write "
                              "plain integers (resolved, no ${...}) for these keys") from None


def read_rep_statistics(path: str | Path) -> Normalizer:
    """Normalizer from an original `rep_statistics.pt` (torch.load weights_only=True)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: copy the dataset's rep_statistics.pt "
                              "(the training normalisation statistics) next to config.yaml")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as a weights-only torch file "
                              f"({_first_reason(e)}); it must hold only "
                              "{'mean': tensor, 'var': tensor}: re-save it that way") from None
    if not isinstance(obj, dict) or not {"mean", "var"} <= set(obj) \
            or not all(isinstance(obj[k], torch.Tensor) for k in ("mean", "var")):
        raise CheckpointError(f"{path} must hold a dict {{'mean': tensor, 'var': tensor}}; "
                              f"found {type(obj).__name__} with keys "
                              f"{sorted(obj) if isinstance(obj, dict) else '-'}")
    mean, var = (obj[k].detach().to(torch.float64).numpy() for k in ("mean", "var"))
    try:
        return Normalizer.from_moments(mean, var)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _first_reason(e: Exception) -> str:
    """The informative line of torch's long weights-only error (never its advice to turn
    weights_only off)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
    return pick.split(". Please")[0][:300]


def weights_path(folder: str | Path, checkpoint: str = "final") -> Path:
    """`final` -> final.safetensors; `checkpoints/epoch_N` or just `epoch_N` -> the epoch file."""
    folder = Path(folder)
    name = checkpoint[: -len(".safetensors")] if checkpoint.endswith(".safetensors") \
        else checkpoint
    candidates = [folder / f"{name}.safetensors"]
    if "/" not in name:
        candidates.append(folder / "checkpoints" / f"{name}.safetensors")
    for p in candidates:
        if p.is_file():
            return p
    found = sorted(str(p.relative_to(folder)) for p in
                   [*folder.glob("*.safetensors"), *folder.glob("checkpoints/*.safetensors")])
    raise CheckpointError(f"no weights for checkpoint={checkpoint!r}: {candidates[0]} is "
                          f"missing. Available in {folder}: {found or 'none'}; pass one of "
                          "them (e.g. 'final' or 'checkpoints/epoch_1024')")


class OriginalCheckpoint(NamedTuple):
    cfg: GLPConfig
    model: GLP
    normalizer: Normalizer


def load_original(folder: str | Path, checkpoint: str = "final", *,
                  param_dtype=jnp.float32) -> OriginalCheckpoint:
    """(GLPConfig, GLP, Normalizer) from an original-format folder, without random init.

    Every tensor is checked against config.yaml: a missing, extra or misshapen key raises
    CheckpointError naming it.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory; download the GLP folder "
                              "(config.yaml, rep_statistics.pt, final.safetensors) first")
    cfg = read_config(folder).resolved()
    normalizer = read_rep_statistics(folder / "rep_statistics.pt")
    _check_normalizer(cfg, normalizer, folder / "rep_statistics.pt")
    wpath = weights_path(folder, checkpoint)

    model = abstract_glp(cfg, param_dtype)
    mapping = key_map(cfg)
    try:
        with safe_open(str(wpath), framework="pt") as f:
            _check_keys(cfg, set(f.keys()), {m.torch_key for m in mapping}, wpath)
            groups: dict[tuple[str, ...], list[KeyMap]] = {}
            for m in mapping:
                groups.setdefault(m.path, []).append(m)
            for path, maps in groups.items():
                var = _variable(model, path)
                shape = tuple(var.get_value().shape)
                arr = np.empty(shape, np.float32)
                for m in maps:
                    arr[() if m.layer is None else m.layer] = _read(f, m, shape, wpath)
                var.set_value(jnp.asarray(arr, param_dtype))
                del arr
    except SafetensorError as e:
        raise CheckpointError(f"{wpath} is not a readable safetensors file ({e}); "
                              "re-download or re-export it") from None
    return OriginalCheckpoint(cfg, model, normalizer)


def _check_keys(cfg: GLPConfig, found: set[str], expected: set[str], wpath: Path) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s), e.g. {missing[:4]}")
    if extra:
        parts.append(f"unexpected {len(extra)} key(s), e.g. {extra[:4]}")
    raise CheckpointError(
        f"{wpath} does not match config.yaml (n_layers={cfg.n_layers}, multi_layer_n_layers="
        f"{cfg.multi_layer_n_layers}): {'; '.join(parts)}. Fix config.yaml's "
        "glp_kwargs.denoiser_config or use the weights trained with it")


def _read(f, m: KeyMap, shape: tuple[int, ...], wpath: Path) -> np.ndarray:
    """One tensor in JAX layout, shape-checked against the model."""
    import torch

    want = shape[1:] if m.layer is not None else shape
    torch_want = tuple(reversed(want)) if m.transpose else want
    got = tuple(f.get_slice(m.torch_key).get_shape())
    if got != torch_want:
        raise CheckpointError(f"{wpath}: tensor {m.torch_key} has shape {got}, config.yaml "
                              f"implies {torch_want}; the config and weights disagree")
    t = f.get_tensor(m.torch_key).to(torch.float32).numpy()
    return t.T if m.transpose else t


def _check_normalizer(cfg: GLPConfig, norm: Normalizer, path: Path) -> None:
    if norm.d != cfg.d_input:
        raise CheckpointError(f"{path}: statistics have d={norm.d} but config.yaml says "
                              f"d_input={cfg.d_input}; use the statistics of the training data")
    rows = norm.n_layers
    if rows not in (None, 1) and rows != cfg.multi_layer_n_layers:
        raise CheckpointError(f"{path}: statistics have {rows} layer rows but config.yaml "
                              f"says multi_layer_n_layers={cfg.multi_layer_n_layers}")


# ---------------------------------------------------------------------------- writing


def export_original(model: GLP, normalizer: Normalizer, folder: str | Path, *,
                    checkpoint: str = "final", extra_config: dict[str, Any] | None = None
                    ) -> Path:
    """Write `model` + `normalizer` in the original layout; returns the weights path.

    The original's `load_glp` can read the result (normalizer_config.rep_statistic is the
    `${rep_statistic}` interpolation it overrides). extra_config: more top-level YAML keys
    (e.g. the training config); its glp_kwargs.denoiser_config is replaced by the model's.
    Files are written to a temporary name and renamed, so a crash leaves no partial file.
    """
    import torch
    import yaml
    from safetensors.numpy import save_file

    folder = Path(folder)
    cfg = model.cfg.resolved()
    wpath = folder / f"{checkpoint}.safetensors"
    wpath.parent.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, np.ndarray] = {}
    for m in key_map(cfg):
        value = np.asarray(_variable(model, m.path).get_value(), dtype=np.float32)
        if m.layer is not None:
            value = value[m.layer]
        tensors[m.torch_key] = np.ascontiguousarray(value.T if m.transpose else value)
    _atomic(wpath, lambda p: save_file(tensors, str(p)))

    stats = {k: torch.from_numpy(np.array(getattr(normalizer, k), dtype=np.float32))
             for k in ("mean", "var")}
    for stats_dir in {folder, wpath.parent}:
        _atomic(stats_dir / "rep_statistics.pt", lambda p: torch.save(stats, p))

    config = dict(extra_config or {})
    glp_kwargs = dict(config.get("glp_kwargs") or {})
    glp_kwargs.setdefault("normalizer_config", {"rep_statistic": "${rep_statistic}"})
    glp_kwargs["denoiser_config"] = cfg.to_dict()
    config["glp_kwargs"] = glp_kwargs
    config.setdefault("rep_statistic", "rep_statistics.pt")
    config.setdefault("exported_by", f"glp_jax {__version__}")
    _atomic(folder / "config.yaml",
            lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))
    return wpath


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
