"""Import of the original release's dataset format from a fixture written in exactly that
format: headerless int16 memmaps of bf16 bit patterns, data_indices.npy, dtype.txt,
rep_statistics.pt (torch pickle of fp32 mean/var)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from glp_jax.cli import main
from glp_jax.data.store import ActivationStore
from glp_jax.errors import StoreError
from glp_jax.interop.original_data import import_original

D = 24


def _write_fixture(root, n_rows, rows_per_file, file_elems):
    """Writes like the original MemmapWriter: rows never straddle files, tails stay zero."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n_rows, D)) * 2 + 1).astype(ml_dtypes.bfloat16)
    layer_dir = root / "layer_07"
    layer_dir.mkdir(parents=True)
    (layer_dir / "dtype.txt").write_text("int16")
    indices = []
    for f in range((n_rows + rows_per_file - 1) // rows_per_file):
        part = x[f * rows_per_file:(f + 1) * rows_per_file].view(np.int16)
        mm = np.memmap(layer_dir / f"data_{f:04d}.npy", mode="w+", dtype=np.int16, shape=file_elems)
        mm[: part.size] = part.reshape(-1)
        mm.flush()
        indices += [(f, r * D, (r + 1) * D) for r in range(len(part))]
    np.save(layer_dir / "data_indices.npy", np.array(indices, dtype=np.uint64))
    xf = torch.from_numpy(x.astype(np.float32))  # the original: fp32 E[x^2]-E[x]^2
    mean = xf.mean(0)
    torch.save({"mean": mean, "var": (xf ** 2).mean(0) - mean ** 2}, layer_dir / "rep_statistics.pt")
    return x


def test_import_reproduces_rows_and_statistics(tmp_path):
    x = _write_fixture(tmp_path / "orig", n_rows=1000, rows_per_file=300, file_elems=300 * D + 50)
    assert (tmp_path / "orig/layer_07/data_0000.npy").read_bytes()[:6] != b"\x93NUMPY"
    store = import_original(str(tmp_path / "orig"), str(tmp_path / "dst"), model="llama1b",
                            progress=False)
    assert store.layers == [7] and store.d == D and len(store) == 1000
    np.testing.assert_array_equal(store.read_raw(0, 1000).view(np.uint16), x.view(np.uint16))
    xd = x.astype(np.float64)
    np.testing.assert_allclose(store.mean(7), xd.mean(0), rtol=1e-10)
    np.testing.assert_allclose(store.var(7), xd.var(0), rtol=1e-10)
    rep = torch.load(tmp_path / "orig/layer_07/rep_statistics.pt", weights_only=True)
    np.testing.assert_allclose(store.mean(7), rep["mean"].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.var(7), rep["var"].double().numpy(), rtol=1e-4)
    # Re-running resumes: nothing is duplicated.
    again = import_original(str(tmp_path / "orig"), str(tmp_path / "dst"), model="llama1b",
                            progress=False)
    assert len(again) == 1000


def test_import_cli_and_errors(tmp_path, capsys):
    _write_fixture(tmp_path / "orig", n_rows=50, rows_per_file=50, file_elems=50 * D)
    assert main(["store", "import-original", str(tmp_path / "orig"), str(tmp_path / "dst"),
                 "--quiet"]) == 0
    assert len(ActivationStore.open(tmp_path / "dst")) == 50
    (tmp_path / "orig/layer_07/data_0000.npy").write_bytes(b"\x00" * 100)  # truncated file
    with pytest.raises(StoreError, match="shorter than data_indices"):
        import_original(str(tmp_path / "orig"), str(tmp_path / "dst2"), progress=False)
    assert main(["store", "import-original", str(tmp_path / "nothing"), str(tmp_path / "d3")]) == 2
    assert "does not exist" in capsys.readouterr().err
