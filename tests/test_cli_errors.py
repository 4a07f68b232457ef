"""Bad input through the `glp` command: a clear message, exit code 2, no damage."""

import json
import os
import subprocess
import sys

import numpy as np

from glp_jax.cli import main
from glp_jax.data.store import ActivationStore, StoreMeta


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_layer_out_of_range(tmp_path, capsys):
    code, err = _run(["extract", "--layers", "30", "--max-tokens", "10", "--out",
                      str(tmp_path / "s")], capsys)
    assert code == 2 and "layer 30 is out of range" in err and "0..29" in err
    assert not (tmp_path / "s").exists()


def test_unknown_model_path(tmp_path, capsys):
    code, err = _run(["extract", "--model", str(tmp_path / "no-such-model"), "--max-tokens", "10",
                      "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_hub_model_offline(tmp_path, capsys):
    code, err = _run(["extract", "--model", "nobody/not-a-model-xyz", "--max-tokens", "10",
                      "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "cannot load model" in err and "HF_HUB_OFFLINE" in err


def test_bad_max_tokens_and_empty_corpus(tmp_path, capsys):
    code, err = _run(["extract", "--max-tokens", "0", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "--max-tokens must be positive" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = _run(["extract", "--corpus", str(empty), "--max-tokens", "10", "--out",
                      str(tmp_path / "s2")], capsys)
    assert code == 2 and "no documents" in err


def test_extract_into_store_of_another_layer_or_model(tmp_path, capsys):
    path = tmp_path / "s"
    meta = StoreMeta(model="smollm2:SmolLM2-135M-Instruct.Q4_1", layers=[3], d=576,
                     corpus="fortune", tokenizer="smollm2:SmolLM2-135M-Instruct.Q4_1",
                     seed=42, extra={"val_docs": None, "llm_dtype": "float32"})
    store = ActivationStore.create(path, meta)
    store.append({3: np.ones((5, 576))}, np.arange(5), np.zeros(5))
    before = (path / "commit.npz").read_bytes()
    code, err = _run(["extract", "--layers", "14", "--max-tokens", "10", "--out", str(path)], capsys)
    assert code == 2 and "layers: store has [3], requested [14]" in err and "Nothing was changed" in err
    other = StoreMeta(**{**meta.__dict__, "model": "someone/else", "d": 64})
    store2 = ActivationStore.create(tmp_path / "o", other)
    del store2
    code, err = _run(["extract", "--layers", "3", "--max-tokens", "10", "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and "model: store has 'someone/else'" in err and "d: store has 64" in err
    assert (path / "commit.npz").read_bytes() == before
    assert len(ActivationStore.open(path)) == 5


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"1234")
    code, err = _run(["store", "info", str(tmp_path / "d")], capsys)
    assert code == 2 and "not an activation store" in err
    code, err = _run(["extract", "--max-tokens", "10", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "not an activation store" in err
    assert (tmp_path / "d" / "x.bin").read_bytes() == b"1234"


def test_store_info_json(tmp_path):
    meta = StoreMeta(model="m", layers=[1], d=8, shard_rows=64)
    store = ActivationStore.create(tmp_path / "s", meta)
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    store.append({1: x}, np.arange(40), np.zeros(40))
    out = subprocess.run([sys.executable, "-m", "glp_jax", "store", "info", str(tmp_path / "s"),
                          "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    info = json.loads(out.stdout)
    assert info["rows"] == 40 and info["d"] == 8 and info["layers"] == [1]
    stored = store.read_range(0, 40).astype(np.float64)
    assert abs(info["stats"]["1"]["mean_std"] - stored.std(0).mean()) < 1e-9
    assert info["size_on_disk_bytes"] > 40 * 8 * 2


def test_counts_must_be_positive_one_line_no_traceback(tmp_path, capsys):
    import pytest

    for argv in (["sample", str(tmp_path), "--n", "0", "--out", str(tmp_path / "x.npy")],
                 ["sample", str(tmp_path), "--n", "-5", "--out", str(tmp_path / "x.npy")],
                 ["sample", str(tmp_path), "--steps", "0", "--out", str(tmp_path / "x.npy")],
                 ["eval", "fd", str(tmp_path), "--n", "zero"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert "must be a positive integer" in err or "is not an integer" in err
        assert err.strip().splitlines()[-1].startswith("glp ")  # argparse: usage + one line
    assert not (tmp_path / "x.npy").exists()


def test_store_path_that_is_a_file_and_unwritable_output_path_are_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_bytes(b"keep me")
    code, err = _run(["extract", "--max-tokens", "10", "--out", str(f)], capsys)
    assert code == 2 and "exists and is not a folder" in err and "Traceback" not in err
    assert f.read_bytes() == b"keep me"
    store = ActivationStore.create(tmp_path / "s", StoreMeta(model="m", layers=[0], d=4))
    store.append({0: np.ones((64, 4), np.float32)}, np.zeros(64), np.arange(64))
    code, err = _run(["train", f"train_dataset={tmp_path / 's'}", "num_steps=1",
                      "batch_size=16", "d_model=8", "d_mlp=8", "n_layers=1", "use_bf16=false",
                      f"output_path={f / 'run'}", "progress=false"], capsys)
    assert code == 2 and "cannot write the run folder" in err and "output_path=" in err
    assert len(err.strip().splitlines()) == 1 and f.read_bytes() == b"keep me"
