"""Damaged stores are found and named precisely: `glp store verify` by layer and row range,
a read (training included) as one error naming the store, layer and rows. The expected
ranges come from parsing the zarr3 shard index independently of tensorstore."""

import os

import numpy as np
import pytest

from glp_jax.cli import main
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.data.verify import verify_store
from glp_jax.errors import StoreError

SHARD, CHUNK, D, ROWS = 64, 8, 8, 256


def _make(path, layers=(0, 5)):
    rng = np.random.default_rng(1)
    store = ActivationStore.create(path, StoreMeta(model="m", layers=list(layers), d=D,
                                                   shard_rows=SHARD, chunk_rows=CHUNK))
    for a in range(0, ROWS, 96):  # several appends: chunks land in the files out of order
        b = min(a + 96, ROWS)
        store.append({k: rng.standard_normal((b - a, D)) * (k + 1) for k in layers},
                     np.arange(a, b), np.arange(a, b) // 4)
    return store


def _chunk_table(path):
    """[(offset, nbytes)] per inner chunk, parsed from the shard index at the file's end
    (zarr3 sharding: uint64 offset and length per chunk, then a 4-byte crc32c)."""
    raw = open(path, "rb").read()
    n = SHARD // CHUNK
    index = np.frombuffer(raw[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    return [(int(o), int(b)) for o, b in index]


@pytest.fixture
def store_path(tmp_path):
    _make(tmp_path / "s")
    return tmp_path / "s"


def test_new_store_is_checksummed_and_verifies(store_path, capsys):
    store = ActivationStore.open(store_path)
    assert store.checksums() == "chunks+index" and store.info()["checksums"] == "chunks+index"
    report = verify_store(str(store_path), progress=False)
    assert report.ok and report.rows == ROWS and report.shards_read == 4 * 4
    assert main(["store", "verify", str(store_path), "--quiet"]) == 0
    assert "ok: every chunk" in capsys.readouterr().out
    assert main(["store", "info", str(store_path)]) == 0
    assert "crc32c on every chunk and shard index" in capsys.readouterr().out


CASES = [("flip", "chunk", 0, 0), ("flip", "chunk", 3, 57), ("flip", "chunk", 7, -1),
         ("flip", "chunk", 5, -3), ("flip", "index", None, -10),
         ("truncate", None, None, 0), ("truncate", None, None, 0.5), ("truncate", None, None, -1)]


@pytest.mark.parametrize("kind,region,chunk,where", CASES)
def test_damage_is_reported_by_layer_and_rows(store_path, capsys, kind, region, chunk, where):
    f = store_path / "layer_5" / "c" / "1" / "0"  # layer 5, rows [64, 128)
    raw = bytearray(f.read_bytes())
    if kind == "flip":
        if region == "chunk":  # a byte of chunk `chunk` (data, or its crc when where < 0)
            off, nbytes = _chunk_table(f)[chunk]
            pos = off + (where if where >= 0 else nbytes + where)
            expect = (SHARD + chunk * CHUNK, SHARD + (chunk + 1) * CHUNK, "checksum mismatch")
        else:
            pos = len(raw) + where
            expect = (SHARD, 2 * SHARD, "truncated or its index is corrupt")
        raw[pos] ^= 0x10
        f.write_bytes(bytes(raw))
    else:
        keep = int(len(raw) * where) if where >= 0 else len(raw) + where
        f.write_bytes(bytes(raw[:keep]))
        expect = (SHARD, 2 * SHARD, "truncated or its index is corrupt")
    report = verify_store(str(store_path), progress=False)
    assert [(d.array, d.start, d.stop) for d in report.damage] == [("layer 5", *expect[:2])]
    assert expect[2] in report.damage[0].what
    assert report.stats == {"layer 0": "ok", "layer 5": "not compared (damaged rows)"}
    assert main(["store", "verify", str(store_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"layer 5 rows [{expect[0]}, {expect[1]})" in out and "DAMAGED" in out
    store = ActivationStore.open(store_path)
    store.read_rows(np.arange(ROWS), 0)  # the other layer is intact
    with pytest.raises(StoreError) as e:
        store.read_rows([expect[0] + 1, 3], 5)
    msg = str(e.value)
    assert f"store {store_path}" in msg and f"layer 5 rows [{expect[0]}, {expect[1]})" in msg
    assert "\n" not in msg and expect[2] in msg
    store.read_rows([0, 200], 5)  # other shards of the damaged layer still read


def test_missing_shard_and_nan_rows(store_path):
    os.remove(store_path / "doc_ids" / "c" / "2")
    store = ActivationStore.open(store_path)
    nan = np.full((2, D), np.nan)
    store._acts[0][10:12].write(nan.astype(store._acts[0].dtype.numpy_dtype)).result()
    report = verify_store(str(store_path), progress=False)
    got = {(d.array, d.start, d.stop, d.what) for d in report.damage}
    assert got == {("doc_ids", 128, 192, "shard file is missing"),
                   ("layer 0", 10, 12, "rows hold NaN/Inf")}


def test_statistics_catch_changes_in_a_store_without_chunk_checksums(tmp_path, monkeypatch):
    """Stores made before chunk checksums (crc32c on the shard index only) stay readable;
    an altered chunk reads back silently there, so verify compares the float64 moments."""
    import glp_jax.data.store as store_mod

    spec = store_mod._array_spec

    def index_only(*a, **k):
        out = spec(*a, **k)
        conf = out["metadata"]["codecs"][0]["configuration"]
        conf["codecs"] = [c for c in conf["codecs"] if c["name"] != "crc32c"]
        return out

    monkeypatch.setattr(store_mod, "_array_spec", index_only)
    store = _make(tmp_path / "old", layers=(0,))
    monkeypatch.undo()
    assert ActivationStore.open(tmp_path / "old").checksums() == "index"
    assert verify_store(str(tmp_path / "old"), progress=False).ok
    before = store.read_range(0, ROWS, 0)
    f = tmp_path / "old" / "layer_0" / "c" / "2" / "0"
    raw = bytearray(f.read_bytes())
    off, _ = _chunk_table(f)[4]
    raw[off + 5] ^= 0x01  # an exponent bit of one bf16 value: x4 or /4, still finite
    f.write_bytes(bytes(raw))
    after = store.read_range(0, ROWS, 0)  # reads back silently: no chunk checksum
    changed = np.argwhere(after != before)
    assert changed.tolist() == [[2 * SHARD + 4 * CHUNK, 2]] and np.isfinite(after).all()
    report = verify_store(str(tmp_path / "old"), progress=False)
    assert not report.damage and "statistics differ" in report.stats["layer 0"]


def test_training_on_a_corrupt_store_is_one_error(store_path, tmp_path, capsys):
    f = store_path / "layer_0" / "c" / "2" / "0"
    raw = bytearray(f.read_bytes())
    off, _ = _chunk_table(f)[6]
    raw[off + 1] ^= 1
    f.write_bytes(bytes(raw))
    code = main(["train", f"train_dataset={store_path}", "layers=[0]", "num_steps=16",
                 "batch_size=16", "d_model=8", "d_mlp=8", "n_layers=1", "use_bf16=false",
                 f"output_path={tmp_path / 'run'}", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"store {store_path}: layer 0 rows [{2 * SHARD + 6 * CHUNK}, {2 * SHARD + 7 * CHUNK})" in err
