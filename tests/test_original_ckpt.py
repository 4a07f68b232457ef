"""Original-format checkpoint folders: load vs a float64 numpy forward, export round trip,
and clear errors. The fixture folder is built here with torch in the original layout."""

import jax
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glp_jax.errors import CheckpointError
from glp_jax.interop.original_ckpt import export_original, load_original

# ---------------------------------------------------------------- fixture in torch


class _Block(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.up_proj, self.gate_proj, self.time_proj = (nn.Linear(D, H) for _ in range(3))
        self.down_proj = nn.Linear(H, D)


class _Denoiser(nn.Module):
    """Same module names (hence state_dict keys) as the original TransformerMLPDenoiser."""

    def __init__(self, d, D, H, n_layers, multi):
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(d, D), nn.Linear(D, d)
        self.time_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.layer_embed = (nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
                            if multi else nn.Identity())
        self.layers = nn.ModuleList(_Block(D, H) for _ in range(n_layers))
        self.ln = nn.LayerNorm(D)


class _Wrapper(nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.model = _Denoiser(*args)


CONFIG_YAML = """\
save_root: .
model_name: meta-llama/Llama-3.2-1B
run_name: glp-tiny-d${{glp_kwargs.denoiser_config.n_layers}}
output_path: ${{save_root}}/runs/${{run_name}}
train_dataset: ${{save_root}}/data/tiny/layer_07
rep_statistic: ${{train_dataset}}/rep_statistics.pt
dynamic_dataset: false
glp_kwargs:
  normalizer_config:
    rep_statistic: ${{rep_statistic}}
  denoiser_config:
    d_input: {d}
    d_model: {D}
    d_mlp: {H}
    n_layers: {n_layers}
    multi_layer_n_layers: {multi}
  tracedict_config:
    layer_prefix: model.layers
    layers:
    - 7
    retain: output
use_bf16: true
learning_rate: 5.0e-05
lr_scheduler:
  scheduler_cls: cosine_scheduler_with_warmup
  warmup_ratio: 0.01
  initial_factor: 0.01
  final_factor: 0.1
"""


def _state_dict(d, D, H, n_layers, multi, seed):
    torch.manual_seed(seed)
    sd = _Wrapper(d, D, H, n_layers, multi).state_dict()
    for k in sd:  # LayerNorm defaults 1/0 would hide bugs in their use
        if ".ln." in k or k.startswith("model.ln."):
            sd[k] = sd[k] + 0.2 * torch.randn(sd[k].shape)
    return {k: v.contiguous() for k, v in sd.items()}


def make_folder(root, d=8, D=12, H=20, n_layers=2, multi=None, seed=0):
    """An original-format GLP folder: config.yaml, rep_statistics.pt, final.safetensors and
    checkpoints/epoch_2.safetensors (different weights)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(CONFIG_YAML.format(
        d=d, D=D, H=H, n_layers=n_layers, multi="null" if multi is None else multi))
    save_file(_state_dict(d, D, H, n_layers, multi, seed), root / "final.safetensors")
    (root / "checkpoints").mkdir(exist_ok=True)
    save_file(_state_dict(d, D, H, n_layers, multi, seed + 1),
              root / "checkpoints" / "epoch_2.safetensors")
    g = torch.Generator().manual_seed(seed)
    shape = (multi, d) if multi else (d,)
    torch.save({"mean": torch.randn(shape, generator=g),
                "var": torch.rand(shape, generator=g) + 0.5}, root / "rep_statistics.pt")
    return root


def read_tensors(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------- numpy float64 reference


def np_forward_torch_layout(T, x, sigma, layer_idx=None, n_llm_layers=None):
    """Float64 forward straight from the safetensors tensors (torch layout, W [out, in])."""
    T = {k: v.astype(np.float64) for k, v in T.items()}
    lin = lambda h, n: h @ T[f"model.{n}.weight"].T + T[f"model.{n}.bias"]  # noqa: E731
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731

    def ln(h, n):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * T[f"model.{n}.weight"] + T[f"model.{n}.bias"]

    def emb(t, dim):  # fp32 argument as specified (see tests/test_model.py), float64 trig
        f = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2)).astype(np.float32)
        args = (np.asarray(t, np.float32)[:, None] * f[None]).astype(np.float64)
        return np.concatenate([np.cos(args), np.sin(args)], -1)

    D = T["model.in_proj.weight"].shape[0]
    e = lin(silu(lin(emb(np.float32(1000) * sigma, D), "time_embed.0")), "time_embed.2")
    if layer_idx is not None:
        depth = np.asarray(layer_idx, np.float32) / np.float32(n_llm_layers - 1)
        e = e + lin(silu(lin(emb(depth, D), "layer_embed.0")), "layer_embed.2")
    h = lin(x.astype(np.float64), "in_proj")
    i = 0
    while f"model.layers.{i}.ln.weight" in T:
        y = ln(h, f"layers.{i}.ln")
        a = silu(lin(y, f"layers.{i}.gate_proj") * lin(e, f"layers.{i}.time_proj")) \
            * lin(y, f"layers.{i}.up_proj")
        h = h + lin(a, f"layers.{i}.down_proj")
        i += 1
    return lin(ln(h, "ln"), "out_proj")


ATOL = 5e-6  # fp32 vs float64 on O(1) values, contractions over <= 20 terms (see test_model)


def _inputs(d, B=5, seed=0):
    rng = np.random.default_rng(seed)
    sigma = np.concatenate([[1.0, 0.001], rng.uniform(0, 1, B - 2)]).astype(np.float32)
    return rng.standard_normal((B, d)).astype(np.float32), sigma


def test_load_matches_numpy_forward(tmp_path):
    folder = make_folder(tmp_path / "glp")
    cfg, model, norm = load_original(folder)
    assert (cfg.d_input, cfg.d_model, cfg.d_mlp, cfg.n_layers) == (8, 12, 20, 2)
    assert cfg.multi_layer_n_layers is None and model.layer_embed is None
    x, sigma = _inputs(8)
    v = jax.jit(lambda x, s: model(x, s))(x, sigma)
    ref = np_forward_torch_layout(read_tensors(folder / "final.safetensors"), x, sigma)
    np.testing.assert_allclose(np.asarray(v), ref, rtol=0, atol=ATOL)
    stats = torch.load(folder / "rep_statistics.pt", weights_only=True)
    np.testing.assert_array_equal(np.asarray(norm.mean), stats["mean"].numpy())
    np.testing.assert_array_equal(np.asarray(norm.var), stats["var"].numpy())


@pytest.mark.parametrize("name", ["checkpoints/epoch_2", "epoch_2", "epoch_2.safetensors"])
def test_load_epoch_checkpoint(tmp_path, name):
    folder = make_folder(tmp_path / "glp")
    _, model, _ = load_original(folder, name)
    x, sigma = _inputs(8)
    ref = np_forward_torch_layout(
        read_tensors(folder / "checkpoints" / "epoch_2.safetensors"), x, sigma)
    np.testing.assert_allclose(np.asarray(jax.jit(model)(x, sigma)), ref, rtol=0, atol=ATOL)


def test_load_multi_layer(tmp_path):
    folder = make_folder(tmp_path / "multi", d=8, D=16, H=32, n_layers=3, multi=4, seed=5)
    cfg, model, norm = load_original(folder)
    assert cfg.multi_layer_n_layers == 4 and norm.n_layers == 4
    x, sigma = _inputs(8, B=4)
    layer = np.array([0, 3, 1, 2])
    v = jax.jit(lambda x, s, li: model(x, s, li))(x, sigma, layer)
    ref = np_forward_torch_layout(read_tensors(folder / "final.safetensors"), x, sigma,
                                  layer, 4)
    np.testing.assert_allclose(np.asarray(v), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("multi", [None, 4])
def test_export_reload_is_bit_exact(tmp_path, multi):
    src = make_folder(tmp_path / "src", n_layers=3, multi=multi, seed=2)
    cfg, model, norm = load_original(src)
    out = export_original(model, norm, tmp_path / "out", extra_config={"model_name": "tiny"})
    assert out == tmp_path / "out" / "final.safetensors"
    # Same tensors, bit for bit, as the original file (keys, shapes, values).
    a, b = read_tensors(src / "final.safetensors"), read_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32 and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cfg2, model2, norm2 = load_original(tmp_path / "out")
    assert cfg2 == cfg
    s1 = nnx.to_flat_state(nnx.state(model, nnx.Param))
    s2 = dict(nnx.to_flat_state(nnx.state(model2, nnx.Param)))
    for path, var in s1:
        np.testing.assert_array_equal(np.asarray(var.get_value()),
                                      np.asarray(s2[path].get_value()), err_msg=str(path))
    for f in ("mean", "var", "std"):
        np.testing.assert_array_equal(np.asarray(getattr(norm, f)), np.asarray(getattr(norm2, f)))
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["model_name"] == "tiny"
    assert config["glp_kwargs"]["normalizer_config"]["rep_statistic"] == "${rep_statistic}"
    assert config["glp_kwargs"]["denoiser_config"]["multi_layer_n_layers"] == multi
    stats = torch.load(tmp_path / "out" / "rep_statistics.pt", weights_only=True)
    assert stats["mean"].dtype == torch.float32


def test_export_epoch_checkpoint(tmp_path):
    _, model, norm = load_original(make_folder(tmp_path / "src"))
    path = export_original(model, norm, tmp_path / "out", checkpoint="checkpoints/epoch_4")
    assert path.is_file() and (path.parent / "rep_statistics.pt").is_file()
    assert (tmp_path / "out" / "rep_statistics.pt").is_file()
    assert not list((tmp_path / "out").rglob("*.tmp"))
    load_original(tmp_path / "out", "epoch_4")


# ---------------------------------------------------------------- errors


def test_missing_key(tmp_path):
    folder = make_folder(tmp_path / "glp")
    t = read_tensors(folder / "final.safetensors")
    del t["model.layers.1.time_proj.bias"]
    save_file({k: torch.from_numpy(v) for k, v in t.items()}, folder / "final.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key.*model\.layers\.1\.time_proj\.bias"):
        load_original(folder)


def test_extra_layer_means_config_mismatch(tmp_path):
    folder = make_folder(tmp_path / "glp", n_layers=3)
    cfg_text = (folder / "config.yaml").read_text().replace("n_layers: 3", "n_layers: 2")
    (folder / "config.yaml").write_text(cfg_text)
    with pytest.raises(CheckpointError, match=r"n_layers=2.*unexpected.*model\.layers\.2\."):
        load_original(folder)


def test_wrong_shape(tmp_path):
    folder = make_folder(tmp_path / "glp")
    t = read_tensors(folder / "final.safetensors")
    t["model.in_proj.weight"] = np.zeros((12, 9), np.float32)
    save_file({k: torch.from_numpy(v) for k, v in t.items()}, folder / "final.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.in_proj\.weight has shape \(12, 9\).*"
                                              r"\(12, 8\)"):
        load_original(folder)


@pytest.mark.parametrize("missing,match", [
    ("final.safetensors", r"final\.safetensors is missing.*checkpoints/epoch_2\.safetensors"),
    ("rep_statistics.pt", r"rep_statistics\.pt is missing"),
    ("config.yaml", r"config\.yaml is missing"),
])
def test_missing_file(tmp_path, missing, match):
    folder = make_folder(tmp_path / "glp")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=match):
        load_original(folder)


def test_missing_folder_and_epoch(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_original(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="epoch_9"):
        load_original(make_folder(tmp_path / "glp"), "checkpoints/epoch_9")


def test_corrupt_files(tmp_path):
    folder = make_folder(tmp_path / "glp")
    (folder / "final.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_original(folder)
    folder = make_folder(tmp_path / "glp2")
    (folder / "config.yaml").write_text("glp_kwargs: [unclosed\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_original(folder)


class NotATensor:  # arbitrary pickled classes must be refused, never unpickled
    pass


def test_rep_statistics_weights_only(tmp_path):
    folder = make_folder(tmp_path / "glp")
    torch.save({"mean": NotATensor(), "var": NotATensor()}, folder / "rep_statistics.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_original(folder)
    torch.save({"mean": torch.zeros(7), "var": torch.ones(7)}, folder / "rep_statistics.pt")
    with pytest.raises(CheckpointError, match="d=7.*d_input=8"):
        load_original(folder)
    torch.save([torch.zeros(8)], folder / "rep_statistics.pt")
    with pytest.raises(CheckpointError, match="'mean'"):
        load_original(folder)


def test_unresolved_interpolation_in_denoiser_config(tmp_path):
    folder = make_folder(tmp_path / "glp")
    text = (folder / "config.yaml").read_text().replace("d_model: 12", "d_model: ${width}")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"d_model.*\$\{width\}"):
        load_original(folder)


def test_config_with_the_originals_pathlib_tag_loads_and_other_python_tags_do_not(tmp_path):
    """The original's training code saves output_path as a pathlib Path with PyYAML's full
    dumper; such a folder loads, and any other Python tag is still refused."""
    import pathlib

    import yaml

    from glp_jax.yamlio import safe_load

    folder = make_folder(tmp_path / "glp")
    cfg = safe_load((folder / "config.yaml").read_text())
    cfg["output_path"] = pathlib.PosixPath("/scratch/glp/runs/llama1b-d3")
    text = yaml.dump(cfg)  # the full dumper, as the original wrote it
    assert "!!python/object/apply:pathlib.PosixPath" in text
    (folder / "config.yaml").write_text(text)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(text)  # what was refused before
    assert safe_load(text)["output_path"] == "/scratch/glp/runs/llama1b-d3"
    loaded, _, _ = load_original(folder)
    assert (loaded.d_input, loaded.n_layers) == (8, 2)
    evil = "x: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(yaml.constructor.ConstructorError):
        safe_load(evil)
