"""ActivationStore: bit-exact round trips, float64 statistics, errors that lose no data."""

import os

import ml_dtypes
import numpy as np
import pytest

from glp_jax.data.stats import Moments
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import NonFiniteActivationError, StoreError, StoreMismatchError


def _meta(**kw):
    base = dict(model="test-model", layers=[3], d=16, shard_rows=256, chunk_rows=8)
    base.update(kw)
    return StoreMeta(**base)


def _rows(n, d, seed, scale=3.0, offset=5.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * scale + offset).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    store = ActivationStore.create(tmp_path / "s", _meta(dtype=dtype))
    chunks = [_rows(n, 16, i) for i, n in enumerate([100, 1, 300, 57])]
    for i, x in enumerate(chunks):
        store.append({3: x}, np.arange(len(x)) + 1000 * i, np.full(len(x), i))
    want = np.concatenate(chunks).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    again = ActivationStore.open(tmp_path / "s")
    assert len(again) == len(want) == 458
    raw = again.read_raw(0, len(again))
    assert raw.dtype == want.dtype
    assert np.array_equal(raw.view(np.uint16 if dtype == "bfloat16" else np.uint32),
                          want.view(np.uint16 if dtype == "bfloat16" else np.uint32))
    idx = np.array([457, 3, 3, 200, 0, 101])
    assert np.array_equal(again.read_rows(idx), want.astype(np.float32)[idx])
    assert np.array_equal(again.read_range(10, 20), want.astype(np.float32)[10:20])
    assert np.array_equal(again.doc_ids(), np.repeat(np.arange(4), [100, 1, 300, 57]))
    assert list(again.token_ids([100, 101])) == [1000, 2000]


def test_statistics_equal_numpy_float64(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta())
    for i in range(7):
        store.append({3: _rows(123 + i, 16, i, offset=100.0)}, np.zeros(123 + i), np.zeros(123 + i))
    x = store.read_range(0, len(store)).astype(np.float64)  # the stored (bf16-rounded) values
    mo = ActivationStore.open(tmp_path / "s").moments(3)
    assert mo.count == len(x)
    np.testing.assert_allclose(mo.mean, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(mo.var, x.var(0), rtol=1e-10)


def test_merge_of_halves_equals_whole():
    x = _rows(1001, 32, 0, offset=1e3).astype(np.float64)
    whole = Moments.of(x)
    merged = Moments.of(x[:400]).merge(Moments.of(x[400:]))
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-10)
    np.testing.assert_allclose(merged.var, np.var(x, axis=0), rtol=1e-10)
    assert Moments.zeros((32,)).merge(whole).count == 1001


def test_multi_layer_rows_stay_aligned(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta(layers=[2, 5]))
    a, b = _rows(50, 16, 1), _rows(50, 16, 2)
    store.append({2: a, 5: b}, np.arange(50), np.arange(50))
    np.testing.assert_array_equal(store.read_rows([7], layer=5), b[7:8].astype(ml_dtypes.bfloat16).astype(np.float32))
    with pytest.raises(StoreError, match="name one with layer="):
        store.read_rows([0])
    with pytest.raises(StoreError, match="append got layers"):
        store.append({2: a}, np.arange(50), np.arange(50))


def test_memory_kvstore(tmp_path):
    store = ActivationStore.create("memory://glp-test-store", _meta())
    store.append({3: _rows(10, 16, 0)}, np.arange(10), np.arange(10))
    assert len(ActivationStore.open("memory://glp-test-store")) == 10


def test_nan_rows_are_refused_and_nothing_written(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta())
    store.append({3: _rows(20, 16, 0)}, np.arange(20), np.arange(20))
    bad = _rows(20, 16, 1)
    bad[5, 3] = np.nan
    with pytest.raises(NonFiniteActivationError, match="NaN/Inf"):
        store.append({3: bad}, np.arange(20), np.arange(20))
    again = ActivationStore.open(tmp_path / "s")
    assert len(again) == 20
    assert np.isfinite(again.moments(3).mean).all()


def test_wrong_width_is_refused(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta())
    with pytest.raises(StoreError, match="d=16"):
        store.append({3: _rows(4, 17, 0)}, np.arange(4), np.arange(4))
    assert len(ActivationStore.open(tmp_path / "s")) == 0


def test_mismatch_leaves_store_untouched(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta())
    store.append({3: _rows(30, 16, 0)}, np.arange(30), np.arange(30))
    before = {p: os.path.getmtime(p) for p in _files(tmp_path / "s")}
    with pytest.raises(StoreMismatchError, match="model: store has 'test-model'"):
        ActivationStore.open_or_create(tmp_path / "s", _meta(model="other"))
    with pytest.raises(StoreMismatchError, match="d: store has 16"):
        ActivationStore.open_or_create(tmp_path / "s", _meta(d=32))
    assert {p: os.path.getmtime(p) for p in _files(tmp_path / "s")} == before
    assert len(ActivationStore.open_or_create(tmp_path / "s", _meta())) == 30


def test_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path / "junk")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open_or_create(tmp_path / "junk", _meta())
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore.open(tmp_path / "missing")


def test_corrupt_commit_record(tmp_path):
    ActivationStore.create(tmp_path / "s", _meta())
    (tmp_path / "s" / "commit.npz").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path / "s")


def test_out_of_range_read(tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta())
    store.append({3: _rows(5, 16, 0)}, np.arange(5), np.arange(5))
    with pytest.raises(IndexError):
        store.read_rows([5])


def _files(root):
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs)
