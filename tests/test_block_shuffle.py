"""The block-window shuffle (glp_jax/data/blocks.py) over real stores: each example at most
once per epoch, exact values, seeded, independent of the process count, resumable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from glp_jax.data.blocks import BlockPlan, same_document_pair_fraction
from glp_jax.data.pipeline import PipelineConfig, build_pipeline
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import ConfigError

D, ROWS = 8, 2500


def _store(path, rows=ROWS, layers=(3,), seed=0):
    rng = np.random.default_rng(seed)
    store = ActivationStore.create(str(path), StoreMeta(model="t", layers=list(layers), d=D,
                                                        shard_rows=512, chunk_rows=32))
    shift = rng.normal(size=D) * 4
    x = {k: rng.normal(size=(rows, D)) * (1 + i) * np.linspace(0.5, 3, D) + shift
         for i, k in enumerate(layers)}
    store.append(x, np.arange(rows), np.arange(rows) // 7)
    return str(path), x


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("blk") / "one")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two stores, two layers each: blocks cross layer and store boundaries."""
    root = tmp_path_factory.mktemp("blk")
    a = _store(root / "a", rows=700, layers=(3, 7), seed=1)
    b = _store(root / "b", rows=1100, layers=(3, 7), seed=2)
    return [a[0], b[0]], {k: np.concatenate([a[1][k], b[1][k]]) for k in (3, 7)}


def _cfg(store, **kw):
    base = dict(store=store, batch_size=64, mode="single", shuffle_mode="block",
                block_rows=96, streams=4, window_rows=400, seed=5, num_threads=2)
    return PipelineConfig(**{**base, **kw})


def _batches(cfg, pi=0, pc=1, limit=None):
    it = build_pipeline(cfg, pi, pc).make_iterator()
    try:
        return list(itertools.islice(it, limit))
    finally:
        it.close()


def _examples(b, rows):
    return b["index"] + (b["layer"].astype(np.int64) * rows if "layer" in b else 0)


def test_plan_is_a_partial_permutation_with_a_small_remainder():
    for e, br, s, w, b in [(1000, 64, 4, 100, 16), (10007, 128, 8, 1000, 32), (5000, 5000, 2, 300, 50),
                           (777, 10, 1, 7, 3), (4096, 4096, 1, 4096, 4096)]:
        plan = BlockPlan(e, br, s, w, b, seed=3)
        used = np.concatenate([plan.examples_of(j) for j in range(plan.batches)])
        assert np.unique(used).size == used.size == plan.batches * b * s
        assert e - used.size == e % s + s * ((e // s) % b) < b * s + s
        assert not np.array_equal(plan.examples_of(plan.batches), plan.examples_of(0))


def test_single_epoch_values_and_coverage(one):
    url, x = one
    cfg = _cfg(url)
    batches = _batches(cfg)
    ex = np.concatenate([_examples(b, ROWS) for b in batches])
    assert ex.size == np.unique(ex).size == len(batches) * 64
    assert ROWS - ex.size < 64 + 4
    ref = x[3].astype(np.float64)
    z = (ref - ref.mean(0)) / ref.std(0)
    stored = ActivationStore.open(url).read_range(0, ROWS, 3).astype(np.float64)
    zs = (stored - stored.mean(0)) / stored.std(0)  # bf16 storage: the stored values
    for b in batches:
        np.testing.assert_allclose(b["x"], zs[b["index"]], rtol=1e-4, atol=1e-4)
        assert np.abs(b["x"] - z[b["index"]]).max() < 0.05
    plan = BlockPlan(ROWS, 96, 4, 400, 16, 5)  # the reference order, computed without reading
    for j, b in enumerate(batches):
        np.testing.assert_array_equal(b["index"], plan.examples_of(j))


def test_several_stores_and_layers(two):
    urls, x = two
    rows = 1800
    cfg = _cfg(urls, layers=[3, 7], block_rows=250)
    batches = _batches(cfg)
    ex = np.concatenate([_examples(b, rows) for b in batches])
    assert ex.size == np.unique(ex).size and 2 * rows - ex.size < 64 + 4
    for b in batches[:5]:
        for p, k in enumerate((3, 7)):
            sel = b["layer"] == p
            ref = x[k].astype(np.float64)
            z = (ref - ref.mean(0)) / ref.std(0)
            assert np.abs(b["x"][sel] - z[b["index"][sel]]).max() < 0.05
            assert (b["llm_layer"][sel] == k).all()


def test_seeded_and_reshuffled_each_epoch(one):
    url, _ = one
    a = _batches(_cfg(url, mode="repeat"), limit=80)
    b = _batches(_cfg(url, mode="repeat"), limit=80)
    c = _batches(_cfg(url, mode="repeat", seed=6), limit=3)
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p["x"], q["x"])
    assert not np.array_equal(a[0]["index"], c[0]["index"])
    per_epoch = len(_batches(_cfg(url)))
    e1 = np.concatenate([t["index"] for t in a[per_epoch:2 * per_epoch]])
    e0 = np.concatenate([t["index"] for t in a[:per_epoch]])
    assert np.unique(e1).size == e1.size and not np.array_equal(np.sort(e0), e0)
    assert not np.array_equal(e0, e1)


@pytest.mark.parametrize("pc", [2, 4])
def test_processes_read_their_streams_and_form_the_global_batch(one, pc):
    url, _ = one
    cfg = _cfg(url, mode="repeat")
    whole = _batches(cfg, limit=6)
    parts = [_batches(cfg, pi, pc, limit=6) for pi in range(pc)]
    for j in range(6):
        np.testing.assert_array_equal(np.concatenate([p[j]["index"] for p in parts]),
                                      whole[j]["index"])
        np.testing.assert_array_equal(np.concatenate([p[j]["x"] for p in parts]), whole[j]["x"])


def test_state_restores_mid_epoch_onto_another_process_count(one):
    url, _ = one
    cfg = _cfg(url, mode="repeat")
    whole = _batches(cfg, limit=12)
    it = build_pipeline(cfg, 0, 1).make_iterator()
    for _ in range(7):
        next(it)
    state = it.get_state()
    it.close()
    resumed = []
    for pi in range(2):  # saved by one process, restored by two
        r = build_pipeline(cfg, pi, 2).make_iterator()
        r.set_state(state)
        resumed.append([next(r) for _ in range(5)])
        r.close()
    for k in range(5):
        np.testing.assert_array_equal(
            np.concatenate([resumed[0][k]["index"], resumed[1][k]["index"]]), whole[7 + k]["index"])


def test_windows_in_memory_stay_bounded(one):
    url, _ = one
    pipe = build_pipeline(_cfg(url, mode="repeat", window_rows=100, block_rows=50), 0, 1)
    it = pipe.make_iterator()
    for _ in range(100):
        next(it)
    cache = pipe.transform.cache()
    it.close()
    per_stream = [sum(1 for k in cache._entries if k[0] == s) for s in range(4)]
    assert 1 <= min(per_stream) and max(per_stream) <= cache.keep
    plan = pipe.transform.plan
    assert 100 * plan.stream_batch // plan.window_rows > 4 * cache.keep  # many were dropped


def test_bad_block_settings(one):
    url, _ = one
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        build_pipeline(_cfg(url, batch_size=96), 0, 3)
    with pytest.raises(ConfigError, match="not divisible by shuffle_streams"):
        build_pipeline(_cfg(url, streams=3, batch_size=64), 0, 1)
    with pytest.raises(ConfigError, match="block_rows must be positive"):
        build_pipeline(_cfg(url, block_rows=0), 0, 1)
    with pytest.raises(ConfigError, match="shuffle_mode 'blok' unknown"):
        build_pipeline(_cfg(url, shuffle_mode="blok"), 0, 1)


def test_same_document_pair_fraction_against_brute_force():
    rng = np.random.default_rng(0)
    docs = rng.integers(0, 30, size=200)
    brute = np.mean([docs[i] == docs[j] for i in range(200) for j in range(i + 1, 200)])
    assert abs(same_document_pair_fraction(docs) - brute) < 1e-12
    assert same_document_pair_fraction(np.arange(10)) == 0.0


def test_training_resumes_exactly_in_block_mode(one, tmp_path):
    from glp_jax.config import load_config
    from glp_jax.rundir import read_metrics
    from glp_jax.train import train

    url, _ = one
    args = [f"train_dataset={url}", "layers=[3]", "data_shuffle=block", "shuffle_block_rows=96",
            "shuffle_streams=4", "shuffle_window_rows=400", "num_steps=12", "batch_size=64",
            "d_model=16", "d_mlp=16", "n_layers=1", "use_bf16=false", "progress=false",
            "log_every_n_steps=1", "save_every_n_steps=4"]
    train(load_config([*args, f"output_path={tmp_path / 'a'}"]))
    train(load_config([*args, f"output_path={tmp_path / 'b'}"]), stop_after_steps=5)
    train(load_config([*args, f"output_path={tmp_path / 'b'}"]))
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert len(la) == 12 and la == lb


def test_each_process_reads_only_its_streams(one):
    url, _ = one
    cfg = _cfg(url, mode="repeat")
    for pi in range(2):
        pipe = build_pipeline(cfg, pi, 2)
        it = pipe.make_iterator()
        for _ in range(10):
            next(it)
        it.close()
        read = {k[0] for k in pipe.transform.cache()._entries}
        assert read == {2 * pi, 2 * pi + 1}
