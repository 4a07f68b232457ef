"""The grain pipeline over real (tiny) ActivationStores, checked against numpy float64."""

from __future__ import annotations

import gc
import threading
import time

import grain
import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import (
    index_shuffle_module as grain_shuffle,
)

from glp_jax.data.pipeline import (
    FollowIterator,
    PipelineConfig,
    _Plan,
    build_pipeline,
    index_shuffle,
    z_normalize,
)
from glp_jax.data.stats import Moments
from glp_jax.data.store import COMMIT_KEY, ActivationStore, Commit, StoreMeta
from glp_jax.errors import ConfigError, StoreError, StoreMismatchError

D = 16
ROWS = 3000


def _meta(layers=(3,), d=D, model="test") -> StoreMeta:
    return StoreMeta(model=model, layers=list(layers), d=d, shard_rows=1024, chunk_rows=8)


def _make_store(path, rows=ROWS, layers=(3,), d=D, model="test", seed=0, scale=None) -> str:
    """A store with per-dimension offsets and scales, so the normaliser matters."""
    rng = np.random.default_rng(seed)
    store = ActivationStore.create(str(path), _meta(layers, d, model))
    shift = rng.normal(size=d) * 5
    for a in range(0, rows, 1000):
        m = min(1000, rows - a)
        acts = {k: (rng.normal(size=(m, d)) * (scale or 1 + i) * np.linspace(0.5, 3, d) + shift + i)
                for i, k in enumerate(layers)}
        store.append(acts, np.arange(m), np.full(m, a // 1000))
    return str(path)


def _reference(urls, layer) -> tuple[np.ndarray, np.ndarray]:
    """Float64 rows of the concatenated stores and their z-score, independent of the store's
    own statistics."""
    x = np.concatenate([ActivationStore.open(u).read_range(0, 10**9, layer).astype(np.float64)
                        for u in urls])
    return x, (x - x.mean(0)) / x.std(0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return _make_store(tmp_path_factory.mktemp("pipe") / "one")


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory) -> str:
    return _make_store(tmp_path_factory.mktemp("pipe") / "multi", rows=1000, layers=(3, 7))


def _all(cfg, pi=0, pc=1, limit=None) -> list[dict]:
    it = build_pipeline(cfg, pi, pc).make_iterator()
    out = []
    for b in it:
        out.append(b)
        if limit is not None and len(out) == limit:
            break
    it.close()
    return out


# ----------------------------------------------------------------------------- shuffle
def test_index_shuffle_is_grains_permutation():
    rng = np.random.default_rng(0)
    for max_index in (1, 2, 99, 65535, 65536, 262143, 1_000_003, 2**31 + 7, 10**12 + 3):
        for seed in (0, 1, 2**32 - 1):
            idx = np.unique(np.concatenate([np.arange(min(max_index + 1, 200)),
                                            rng.integers(0, max_index + 1, 200)]))
            want = [grain_shuffle.index_shuffle(int(i), max_index=max_index, seed=seed, rounds=4)
                    for i in idx]
            np.testing.assert_array_equal(index_shuffle(idx, max_index, seed), want)
    perm = index_shuffle(np.arange(1000), 999, 5)
    assert sorted(perm.tolist()) == list(range(1000))


def test_plan_equals_grain_shuffle_batch_shard_repeat():
    """Local batch j of process i is what the literal grain chain would give, epochs included."""
    examples, g, n = 2 * 1500, 256, 2
    nb = examples // g
    for i in range(n):
        ref = grain.MapDataset.range(examples).shuffle(seed=7).batch(g // n, drop_remainder=True)
        ref = ref[: nb * n][i::n].repeat()
        plan = _Plan(examples, 1500, g, g // n, i, nb, 7, True)
        for j in (0, 1, nb - 1, nb, nb + 3, 4 * nb + 2):
            np.testing.assert_array_equal(plan.examples_of(j), ref[j])


# ----------------------------------------------------------------------------- single pass
def test_single_pass_covers_every_row_once_and_normalises(store):
    batches = _all(PipelineConfig(store=store, batch_size=200, mode="single", seed=3))
    assert len(batches) == ROWS // 200
    idx = np.concatenate([b["index"] for b in batches])
    assert idx.dtype == np.int64 and np.array_equal(np.sort(idx), np.arange(ROWS))
    _, z = _reference([store], 3)
    for b in batches:
        assert b["x"].dtype == np.float32 and b["x"].shape == (200, D) and "layer" not in b
        np.testing.assert_allclose(b["x"], z[b["index"]], rtol=1e-5, atol=1e-5)


def test_single_pass_remainder(store):
    batches = _all(PipelineConfig(store=store, batch_size=256, mode="single"))
    idx = np.concatenate([b["index"] for b in batches])
    assert len(batches) == ROWS // 256 and len(np.unique(idx)) == idx.size == 256 * len(batches)
    batches = _all(PipelineConfig(store=store, batch_size=256, mode="single", drop_remainder=False))
    assert [len(b["index"]) for b in batches][-1] == ROWS % 256
    assert np.array_equal(np.sort(np.concatenate([b["index"] for b in batches])), np.arange(ROWS))


def test_shuffle_is_global_and_seeded(store):
    first = _all(PipelineConfig(store=store, batch_size=200, mode="single", seed=0), limit=2)
    again = _all(PipelineConfig(store=store, batch_size=200, mode="single", seed=0), limit=2)
    other = _all(PipelineConfig(store=store, batch_size=200, mode="single", seed=1), limit=2)
    idx = first[0]["index"]
    # one batch draws from across the whole store, not from one shard or chunk
    assert idx.min() < 0.05 * ROWS and idx.max() > 0.95 * ROWS
    assert len(np.unique(idx // 1024)) == 3  # all three 1024-row shards
    assert abs(idx.mean() - ROWS / 2) < 0.1 * ROWS
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["x"], b["x"])
    assert len(np.intersect1d(first[0]["index"], other[0]["index"])) < 50
    ordered = _all(PipelineConfig(store=store, batch_size=200, mode="single", shuffle=False), limit=2)
    np.testing.assert_array_equal(ordered[1]["index"], np.arange(200, 400))


def test_two_processes_reproduce_the_global_batch(store):
    cfg = PipelineConfig(store=store, batch_size=200, mode="single", seed=4)
    whole = _all(cfg)
    parts = [_all(cfg, pi=i, pc=2) for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, a, b in zip(whole, *parts, strict=True):
        assert a["x"].shape == (100, D)
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), w["index"])
        np.testing.assert_array_equal(np.concatenate([a["x"], b["x"]]), w["x"])
    assert not np.intersect1d(np.concatenate([b["index"] for b in parts[0]]),
                              np.concatenate([b["index"] for b in parts[1]])).size


def test_repeat_reshuffles_each_epoch(store):
    per_epoch = ROWS // 200
    batches = _all(PipelineConfig(store=store, batch_size=200, mode="repeat", seed=2),
                   limit=2 * per_epoch + 1)
    ep = [np.concatenate([b["index"] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
          for e in range(2)]
    for e in ep:  # each epoch is a permutation of all rows
        assert np.array_equal(np.sort(e), np.arange(ROWS))
    assert not np.array_equal(ep[0], ep[1])
    assert len(np.intersect1d(batches[0]["index"], batches[per_epoch]["index"])) < 50


# ----------------------------------------------------------------------------- checkpointing
def test_iterator_state_resumes_exactly(store):
    cfg = PipelineConfig(store=store, batch_size=200, mode="repeat", seed=9, num_threads=2)
    full = _all(cfg, limit=20)  # crosses the epoch boundary at 15
    it = build_pipeline(cfg, 0, 1).make_iterator()
    for _ in range(13):
        next(it)
    state = it.get_state()
    it.close()
    fresh = build_pipeline(cfg, 0, 1).make_iterator()
    fresh.set_state(state)
    for want in full[13:]:
        got = next(fresh)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["x"], want["x"])
    fresh.close()


def test_orbax_checkpoint_of_iterator(store, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = PipelineConfig(store=store, batch_size=200, mode="repeat", seed=1)
    full = _all(cfg, limit=6)
    it = build_pipeline(cfg, 0, 1).make_iterator()
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        fresh = build_pipeline(cfg, 0, 1).make_iterator()
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["index"], full[4]["index"])
    it.close()
    fresh.close()


# ----------------------------------------------------------------------------- layers, stores
def test_multi_layer_mixing(multi_store):
    batches = _all(PipelineConfig(store=multi_store, layers=[3, 7], batch_size=200, mode="single"))
    assert len(batches) == 2 * 1000 // 200
    pairs = np.concatenate([b["index"] * 2 + b["layer"] for b in batches])
    assert np.array_equal(np.sort(pairs), np.arange(2000))  # every (row, layer) once
    first = batches[0]["layer"]
    assert first.dtype == np.int32 and 0.25 < first.mean() < 0.75  # layers mixed in a batch
    refs = {p: _reference([multi_store], k)[1] for p, k in enumerate([3, 7])}
    for b in batches:
        np.testing.assert_array_equal(b["llm_layer"], np.array([3, 7])[b["layer"]])
        for p in (0, 1):
            sel = b["layer"] == p
            np.testing.assert_allclose(b["x"][sel], refs[p][b["index"][sel]], rtol=1e-5, atol=1e-5)
    pipe = build_pipeline(PipelineConfig(store=multi_store, layers=[7], batch_size=100), 0, 1)
    b = next(iter(pipe))
    assert "layer" not in b
    np.testing.assert_allclose(b["x"], refs[1][b["index"]], rtol=1e-5, atol=1e-5)
    assert pipe.mean.shape == pipe.std.shape == (1, D)


def test_several_stores_concatenate_with_pooled_statistics(tmp_path):
    a = _make_store(tmp_path / "a", rows=1000, seed=1)
    b = _make_store(tmp_path / "b", rows=2000, seed=2)
    pipe = build_pipeline(PipelineConfig(store=[a, b], batch_size=300, mode="single"), 0, 1)
    np.testing.assert_array_equal(pipe.offsets, [0, 1000, 3000])
    batches = list(pipe.make_iterator())
    idx = np.concatenate([x["index"] for x in batches])
    assert np.array_equal(np.sort(idx), np.arange(3000))
    x64, z = _reference([a, b], 3)
    np.testing.assert_allclose(pipe.mean[0], x64.mean(0), rtol=1e-9, atol=1e-9)
    for x in batches:
        np.testing.assert_allclose(x["x"], z[x["index"]], rtol=1e-5, atol=1e-5)


def test_z_normalize():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(z_normalize(x, [2.0, 4.0], [1.0, 2.0]), [[-1, -1], [1, 1]])
    assert z_normalize(x, [0, 0], [1, 1]).dtype == np.float32


def test_transform_pickles_without_store_handles(store):
    import pickle

    pipe = build_pipeline(PipelineConfig(store=store, batch_size=200, mode="single"), 0, 1)
    want = pipe.dataset[3]
    clone = pickle.loads(pickle.dumps(pipe.dataset))
    np.testing.assert_array_equal(clone[3]["x"], want["x"])
    assert b"TensorStore" not in pickle.dumps(pipe.dataset)


def test_worker_processes_match_threads(store):
    cfg = PipelineConfig(store=store, batch_size=500, mode="single", seed=5)
    want = _all(cfg)
    cfg.num_workers = 1
    got = _all(cfg)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a["x"]), b["x"])
    del got, a
    gc.collect()


# ----------------------------------------------------------------------------- follow
class _Writer(threading.Thread):
    """Appends rows in small commits, as an extraction would, then marks the store exhausted."""

    def __init__(self, url, total, step=150, delay=0.2, pause=0.01, layers=(3,)):
        super().__init__(daemon=True)
        self.url, self.total, self.step, self.delay, self.pause = url, total, step, delay, pause
        self.layers = layers
        self.error = None

    def run(self):
        try:
            store = ActivationStore.open(self.url)
            rng = np.random.default_rng(1)
            time.sleep(self.delay)
            n = 0
            while n < self.total:
                m = min(self.step, self.total - n)
                done = n + m == self.total
                store.append({k: rng.normal(size=(m, D)) * 2 + 1 for k in self.layers},
                             np.arange(m), np.zeros(m), cursor={"exhausted": True} if done else {})
                n += m
                time.sleep(self.pause)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _follow_cfg(url, **kw) -> PipelineConfig:
    base = dict(store=url, batch_size=100, mode="follow", follow_block_batches=2,
                follow_timeout_s=10.0, follow_poll_s=0.01)
    return PipelineConfig(**{**base, **kw})


def test_follow_uses_committed_rows_once_while_writer_appends(tmp_path):
    url = str(tmp_path / "live")
    ActivationStore.create(url, _meta())
    pipe = build_pipeline(_follow_cfg(url), 0, 1)
    assert pipe.rows == 0  # nothing committed yet: the iterator has to wait for the writer
    writer = _Writer(url, total=2050)
    writer.start()
    it = pipe.make_iterator()
    assert isinstance(it, FollowIterator)
    seen, batches = [], []
    for b in it:
        committed = len(pipe.stores[0])  # the iterator's own view of the commit
        assert b["index"].max() < committed
        seen.append(b["index"])
        batches.append(b)
    writer.join(timeout=30)
    assert writer.error is None
    idx = np.concatenate(seen)
    # every row once; the last 50 rows make no full batch and are never delivered
    assert np.array_equal(np.sort(idx), np.arange(2000))
    # shuffled inside each 200-row block, blocks in arrival order
    assert not np.array_equal(idx[:200], np.arange(200))
    assert np.array_equal(np.sort(idx[:200]), np.arange(200))
    # normaliser: float64 moments of the first block, the same on every process and restore
    x64 = ActivationStore.open(url).read_range(0, 200).astype(np.float64)
    np.testing.assert_allclose(pipe.mean[0], x64.mean(0), rtol=1e-9, atol=1e-9)
    x = ActivationStore.open(url).read_range(0, 2050).astype(np.float64)
    for b in batches:
        want = (x[b["index"]] - x64.mean(0)) / x64.std(0)
        np.testing.assert_allclose(b["x"], want, rtol=1e-5, atol=1e-5)


def test_follow_state_and_processes(tmp_path):
    url = str(tmp_path / "done")
    ActivationStore.create(url, _meta(layers=(3, 7)))
    _Writer(url, total=1000, delay=0, pause=0, layers=(3, 7)).run()
    cfg = _follow_cfg(url, layers=[3, 7])
    whole = list(build_pipeline(cfg, 0, 1).make_iterator())
    assert len(whole) == 2000 // 100
    pairs = np.concatenate([b["index"] * 2 + b["layer"] for b in whole])
    assert np.array_equal(np.sort(pairs), np.arange(2000))
    parts = [list(build_pipeline(cfg, i, 2).make_iterator()) for i in range(2)]
    for w, a, b in zip(whole, *parts, strict=True):
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), w["index"])
        np.testing.assert_array_equal(np.concatenate([a["x"], b["x"]]), w["x"])
    it = build_pipeline(cfg, 0, 1).make_iterator()
    for _ in range(5):
        next(it)
    state = it.get_state()
    fresh = build_pipeline(cfg, 0, 1).make_iterator()
    fresh.set_state(state)
    for want in whole[5:]:
        got = next(fresh)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["x"], want["x"])
    with pytest.raises(StopIteration):
        next(fresh)
    with pytest.raises(ConfigError, match="seed"):
        build_pipeline(_follow_cfg(url, layers=[3, 7], seed=1), 0, 1).make_iterator().set_state(state)


def test_follow_times_out_with_a_clear_error(tmp_path):
    url = str(tmp_path / "stalled")
    store = ActivationStore.create(url, _meta())
    store.append({3: np.ones((50, D))}, np.arange(50), np.zeros(50))
    it = build_pipeline(_follow_cfg(url, follow_timeout_s=0.2), 0, 1).make_iterator()
    with pytest.raises(StoreError, match="waited 0.2s .* 200 committed rows .* holds 50"):
        next(it)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(store, multi_store, tmp_path):
    with pytest.raises(ConfigError, match="larger than the 3000 examples"):
        build_pipeline(PipelineConfig(store=store, batch_size=4096), 0, 1)
    with pytest.raises(ConfigError, match="mode 'stream' unknown"):
        build_pipeline(PipelineConfig(store=store, mode="stream"), 0, 1)
    with pytest.raises(ConfigError, match="not divisible"):
        build_pipeline(PipelineConfig(store=store, batch_size=201), 0, 2)
    with pytest.raises(ConfigError, match="no store"):
        build_pipeline(PipelineConfig(), 0, 1)
    with pytest.raises(ConfigError, match="name the ones"):
        build_pipeline(PipelineConfig(store=multi_store, batch_size=10), 0, 1)
    with pytest.raises(StoreError, match=r"no layer\(s\) \[5\]"):
        build_pipeline(PipelineConfig(store=store, layers=[5], batch_size=10), 0, 1)
    with pytest.raises(StoreError, match="does not exist"):
        build_pipeline(PipelineConfig(store=str(tmp_path / "nowhere")), 0, 1)
    empty = str(tmp_path / "empty")
    ActivationStore.create(empty, _meta())
    with pytest.raises(StoreError, match="no committed rows"):
        build_pipeline(PipelineConfig(store=empty, batch_size=10), 0, 1)
    nostats = _make_store(tmp_path / "nostats", rows=100)
    s = ActivationStore.open(nostats)
    s._kv.write(COMMIT_KEY, Commit(100, {}, {3: Moments.zeros((D,))}, 9).to_bytes()).result()
    with pytest.raises(StoreError, match="statistics cover 0 of 100 rows"):
        build_pipeline(PipelineConfig(store=nostats, batch_size=10), 0, 1)
    wide = _make_store(tmp_path / "wide", rows=100, d=8)
    with pytest.raises(StoreMismatchError, match="d: .* has 16, .* has 8"):
        build_pipeline(PipelineConfig(store=[store, wide], batch_size=10), 0, 1)
    other = _make_store(tmp_path / "other", rows=100, model="other-llm")
    with pytest.raises(StoreMismatchError, match="model"):
        build_pipeline(PipelineConfig(store=[store, other], batch_size=10), 0, 1)
    with pytest.raises(ConfigError, match="one store"):
        build_pipeline(PipelineConfig(store=[store, store], mode="follow"), 0, 1)
    with pytest.raises(ConfigError, match="drop_remainder"):
        build_pipeline(PipelineConfig(store=store, batch_size=10, drop_remainder=False), 0, 2)


def test_follow_ends_when_the_extraction_reached_its_target(tmp_path):
    """An extraction stopped by --max-tokens marks target_reached: followers finish the
    last partial block instead of waiting for rows that never come."""
    from glp_jax.data.pipeline import PipelineConfig, build_pipeline
    from glp_jax.data.store import ActivationStore, StoreMeta

    s = ActivationStore.create(tmp_path / "s", StoreMeta(model="m", layers=[0], d=4, shard_rows=512))
    x = np.random.default_rng(0).standard_normal((1500, 4)).astype(np.float32)
    s.append({0: x}, np.zeros(1500), np.zeros(1500), cursor={"target_reached": True})
    pipe = build_pipeline(PipelineConfig(store=str(tmp_path / "s"), batch_size=64, mode="follow",
                                         follow_timeout_s=5, follow_poll_s=0.05),
                          process_index=0, process_count=1)
    batches = list(pipe.make_iterator())
    assert len(batches) == 16 + (1500 - 1024) // 64
    rows = np.concatenate([b["index"] for b in batches])
    assert len(set(rows.tolist())) == rows.size and rows.max() < 1500
