"""`hf:` corpora offline: a local folder of parquet / json shards read through the same
`datasets.load_dataset(..., streaming=True)` path as a hub name; splits and resume."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glp_jax.config import ExtractConfig
from glp_jax.data.corpus import StreamingCorpus, WorkerShard, fortune_corpus, open_corpus
from glp_jax.data.store import ActivationStore
from glp_jax.errors import GLPError
from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta

LAYER = 14


def fortune_rows(n=60):
    """Real English text with labels, in a fixed order."""
    docs = fortune_corpus(["riddles", "science"]).split("all", seed=3)[:n]
    return [{"text": d.text, "label": d.label} for d in docs]


def write_hf_folder(root, rows, fmt, n_train_shards=2, n_val=8):
    """A folder laid out like a hub dataset: train-0000k-of-0000n.<fmt>, validation-...."""
    root.mkdir(parents=True, exist_ok=True)
    train, val = rows[n_val:], rows[:n_val]
    parts = np.array_split(np.arange(len(train)), n_train_shards)
    files = [(f"train-{i:05d}-of-{n_train_shards:05d}", [train[j] for j in p])
             for i, p in enumerate(parts)] + [("validation-00000-of-00001", val)]
    for stem, chunk in files:
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(chunk), root / f"{stem}.parquet")
        else:
            (root / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return train, val


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    rows = fortune_rows()
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fmt in ("parquet", "json"):
        train, val = write_hf_folder(root / fmt, rows, fmt)
        out[fmt] = (root / fmt, train, val)
    return out


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_local_folder_streams_like_the_hub(hf_dirs, fmt):
    import datasets

    path, train, val = hf_dirs[fmt]
    corpus = open_corpus(f"hf:{path}")
    assert isinstance(corpus, StreamingCorpus) and corpus.name == f"hf:{path}"
    assert isinstance(corpus._stream(), datasets.IterableDataset)  # the streaming code path
    texts = [d.text for _, d in corpus.iter_split("all")]
    assert texts == [r["text"] for r in train]  # shard order, row order
    # Our held-out split of a stream: its first val_docs documents; train the rest.
    held = [(i, d.text) for i, d in corpus.iter_split("val", val_docs=5)]
    rest = [(i, d.text) for i, d in corpus.iter_split("train", val_docs=5)]
    assert held == list(enumerate(texts[:5])) and rest == list(enumerate(texts[5:]))
    assert [(i, d.text) for i, d in corpus.iter_split("train", val_docs=5, start=7)] == \
        list(enumerate(texts[5:], start=0))[7:]
    # The folder's own validation split: hf:DIR:validation.
    vcorp = open_corpus(f"hf:{path}:validation")
    assert vcorp.name == f"hf:{path}:validation"
    assert [d.text for _, d in vcorp.iter_split("all")] == [r["text"] for r in val]
    assert {d.label for _, d in vcorp.iter_split("all")} == {r["label"] for r in val}


def test_worker_shards_partition_the_split(hf_dirs):
    path, train, _ = hf_dirs["parquet"]
    corpus = open_corpus(f"hf:{path}")
    shards = [list(WorkerShard(corpus, w, 3).iter_split("train", val_docs=4)) for w in range(3)]
    got = sorted((WorkerShard(corpus, w, 3).global_index(j), d.text)
                 for w, s in enumerate(shards) for j, d in s)
    assert got == list(enumerate(r["text"] for r in train[4:]))
    resumed = list(WorkerShard(corpus, 1, 3).iter_split("train", val_docs=4, start=2))
    assert resumed == shards[1][2:]


def test_bad_hf_specs_are_one_line_errors(tmp_path):
    with pytest.raises(GLPError, match="is not a folder"):
        open_corpus(f"hf:{tmp_path}/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GLPError, match="cannot stream hf:"):
        list(open_corpus(f"hf:{tmp_path}/empty").iter_split("all"))
    with pytest.raises(GLPError, match="cannot stream hf:no-such/dataset.*hf:/path/to/dir"):
        list(open_corpus("hf:no-such/dataset").iter_split("all"))  # offline (conftest)


def test_hf_extraction_resumes_bit_for_bit(smollm2, hf_dirs, tmp_path):
    """Growing an hf: store in two runs (cut mid-document) equals one
    uninterrupted run; the val store holds exactly the first val_docs documents."""
    path, train, _ = hf_dirs["json"]
    corpus = open_corpus(f"hf:{path}")
    cfg = ExtractConfig(layers=[LAYER], val_docs=6, max_length=32, window_docs=4, flush_rows=50)
    ex = Extractor(smollm2, cfg)
    meta = extraction_meta(ex.cfg, smollm2.model_id, smollm2.d, corpus.name)
    one = ActivationStore.create(tmp_path / "one", meta)
    extract_to_store(ex, corpus, one, 240, progress=False)
    parts = ActivationStore.create(tmp_path / "parts", meta)
    for n in (41, 240):  # cut inside a document, then resume
        extract_to_store(ex, corpus, parts, n, progress=False)
    assert len(parts) == len(one) == 240
    np.testing.assert_array_equal(one.read_raw(0, 240).view(np.uint16),
                                  parts.read_raw(0, 240).view(np.uint16))
    np.testing.assert_array_equal(one.doc_ids(), parts.doc_ids())
    assert one.doc_ids().min() == 0  # train documents are renumbered after the held-out ones
    vcfg = ExtractConfig(layers=[LAYER], split="val", val_docs=6, max_length=32)
    vex = Extractor(smollm2, vcfg)
    val = ActivationStore.create(tmp_path / "val", extraction_meta(vex.cfg, smollm2.model_id,
                                                                   smollm2.d, corpus.name))
    res = extract_to_store(vex, corpus, val, 10_000, progress=False)
    assert res.docs_done == 6 and val.cursor["exhausted"]
    ids = smollm2.tokenizer([r["text"] for r in train[:6]])["input_ids"]
    want = np.concatenate([np.asarray(t[: 32 - 1], np.int32) for t in ids])
    np.testing.assert_array_equal(val.token_ids(), want)  # the first 6 stream documents
