"""Corpora: the embedded fortune text, local files, splits, and clear errors."""

import importlib.util
import json

import pytest

from glp_jax.data.corpus import DEFAULT_VAL_DOCS, fortune_corpus, fortune_dir, open_corpus
from glp_jax.errors import GLPError


def test_fortune_has_43_labelled_categories():
    corpus = fortune_corpus()
    assert len(corpus.labels) == 43 and "LICENSE" not in corpus.labels
    # Independent count: entries are separated by lines holding only '%'.
    raw = (fortune_dir() / "riddles").read_text(encoding="utf-8", errors="replace")
    n = sum(1 for e in raw.split("\n%\n") if e.strip().strip("%").strip())
    assert len(fortune_corpus(["riddles"])) == n


def test_splits_are_disjoint_deterministic_and_held_out_by_document():
    corpus = fortune_corpus()
    train, val = corpus.split("train", seed=42), corpus.split("val", seed=42)
    assert len(val) == min(DEFAULT_VAL_DOCS, len(corpus) // 10)
    assert len(train) + len(val) == len(corpus)
    key = lambda d: (d.label, d.text)  # noqa: E731
    assert not {id(d) for d in train} & {id(d) for d in val}  # no document in both
    assert [key(d) for d in corpus.split("val", seed=42)] == [key(d) for d in val]
    assert [key(d) for d in corpus.split("val", seed=1)] != [key(d) for d in val]


def test_local_files(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i}", "label": i % 2}) for i in range(20)))
    c = open_corpus(str(jl))
    assert len(c) == 20 and c.labels == ["0", "1"]
    txt = tmp_path / "c.txt"
    txt.write_text("first para\nstill first\n\nsecond\n\n\nthird")
    assert [d.text for d in open_corpus(str(txt)).split("all", seed=0)] != []
    assert len(open_corpus(str(txt))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(GLPError, match="bad.jsonl:2"):
        open_corpus(str(bad))


def test_bad_specs(tmp_path):
    with pytest.raises(GLPError, match="unknown fortune categories"):
        open_corpus("fortune:nonsense")
    with pytest.raises(GLPError, match="not found"):
        open_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(GLPError, match="unsupported corpus file type"):
        open_corpus(str(tmp_path / "x.csv"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="only checks the message shown when `datasets` is missing")
def test_streaming_without_datasets_says_what_to_install():
    with pytest.raises(GLPError, match="pip install datasets"):
        next(open_corpus("hf:HuggingFaceFW/fineweb:sample-10BT").iter_split("train"))
