"""Extraction from the real SmolLM2: parity with HF hidden states, policies, resume."""

import numpy as np
import pytest
import torch

from glp_jax.config import ExtractConfig
from glp_jax.data.corpus import Corpus, Document, fortune_corpus
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import GLPError
from glp_jax.llm.extract import Extractor, extract_to_store, pack_batches, tokenize_documents

LAYER = 14


def _docs(n=9):
    docs = fortune_corpus(["riddles", "science"]).split("train", seed=0)[:n]
    return list(enumerate(docs))


def _hf_reference(lm, ids, layer):
    """Full-depth HF forward of one unpadded document: hidden_states[layer + 1]."""
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].double().numpy()


def test_parity_with_hf_hidden_states(smollm2):
    docs = _docs()
    # A small token budget forces several padded batches of mixed lengths.
    ex = Extractor(smollm2, ExtractConfig(layers=[LAYER], max_length=96, batch_tokens=200))
    rows = ex.window(docs)
    ids = tokenize_documents(smollm2.tokenizer, [d.text for _, d in docs], 96)
    assert ids[0][0] == 0  # <|endoftext|> prepended: SmolLM2's tokenizer adds no BOS
    worst = 0.0
    for j, doc_ids in enumerate(ids):
        ref = _hf_reference(smollm2, doc_ids, LAYER)
        got = rows.acts[j][LAYER]
        # Position 0 (attention sink) and padding are never stored: rows == positions 1..n-1.
        assert got.shape == (len(doc_ids) - 1, smollm2.d)
        np.testing.assert_array_equal(rows.token_ids[j], doc_ids[1:])
        scale = np.abs(ref[1:]).max()
        worst = max(worst, np.abs(got - ref[1:]).max() / scale)
    # fp32 forward of the same ops; padding and batch shape change only the summation order,
    # so differences are float32 rounding (~1e-6 of the activation scale), far below bf16 (4e-3).
    assert worst < 1e-4, worst


def test_sink_position_would_dominate(smollm2):
    """Why position 0 is dropped: its residual norm dwarfs every other position's."""
    ids = tokenize_documents(smollm2.tokenizer, [_docs(1)[0][1].text], 64)[0]
    h = _hf_reference(smollm2, ids, LAYER)
    norms = np.linalg.norm(h, axis=1)
    assert norms[0] > 20 * np.median(norms[1:])


def test_policies_last_and_k(smollm2):
    docs = _docs(4)
    ids = tokenize_documents(smollm2.tokenizer, [d.text for _, d in docs], 2048)
    last = Extractor(smollm2, ExtractConfig(layers=[LAYER], token_policy="last")).window(docs)
    assert [len(t) for t in last.token_ids] == [1] * 4
    assert [int(t[0]) for t in last.token_ids] == [i[-1] for i in ids]
    k1 = Extractor(smollm2, ExtractConfig(layers=[LAYER], token_policy="k", tokens_per_doc=3, seed=1)).window(docs)
    k2 = Extractor(smollm2, ExtractConfig(layers=[LAYER], token_policy="k", tokens_per_doc=3, seed=1)).window(docs)
    assert [len(t) for t in k1.token_ids] == [min(3, len(i) - 1) for i in ids]
    for a, b in zip(k1.token_ids, k2.token_ids, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pack_batches_respects_budget():
    lengths = [5, 100, 30, 30, 7, 64]
    batches = pack_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1


def _meta(lm, **kw):
    base = dict(model=lm.model_id, layers=[LAYER], d=lm.d, corpus="fortune:riddles,science",
                shard_rows=1024, chunk_rows=8, seed=42)
    base.update(kw)
    return StoreMeta(**base)


def test_max_tokens_cut_and_resume_equal_one_run(smollm2, tmp_path):
    """Growing a store in three runs (cut mid-document) equals one run to the final size."""
    corpus = fortune_corpus(["riddles", "science"])
    ex = Extractor(smollm2, ExtractConfig(layers=[LAYER], window_docs=8, flush_rows=100))
    one = ActivationStore.create(tmp_path / "one", _meta(smollm2))
    extract_to_store(ex, corpus, one, 700, progress=False)
    parts = ActivationStore.create(tmp_path / "parts", _meta(smollm2))
    for n in (123, 400, 700):
        extract_to_store(ex, corpus, parts, n, progress=False)
        assert len(parts) == n
    np.testing.assert_array_equal(one.read_raw(0, 700).view(np.uint16),
                                  parts.read_raw(0, 700).view(np.uint16))
    np.testing.assert_array_equal(one.token_ids(), parts.token_ids())
    np.testing.assert_array_equal(one.doc_ids(), parts.doc_ids())
    assert np.all(np.diff(one.doc_ids()) >= 0)  # rows are in document order


def test_empty_corpus_and_bad_max_tokens(smollm2, tmp_path):
    ex = Extractor(smollm2, ExtractConfig(layers=[LAYER]))
    store = ActivationStore.create(tmp_path / "s", _meta(smollm2))
    with pytest.raises(GLPError, match="no documents"):
        extract_to_store(ex, Corpus("empty", []), store, 10, progress=False)
    with pytest.raises(GLPError, match="max_tokens must be positive"):
        extract_to_store(ex, Corpus("x", [Document("hello there")]), store, 0, progress=False)
    with pytest.raises(GLPError, match="out of range"):
        Extractor(smollm2, ExtractConfig(layers=[30]))


def test_last_layer_is_the_residual_stream_before_the_final_norm(smollm2):
    """HF's last hidden state is post-norm; the store keeps the residual stream, whose
    final-norm image is HF's hidden_states[-1]."""
    from glp_jax.llm.extract import tokenizer_adds_bos

    assert not tokenizer_adds_bos(smollm2.tokenizer)
    docs = _docs(2)
    last = smollm2.n_layers - 1
    rows = Extractor(smollm2, ExtractConfig(layers=[last], max_length=64)).window(docs)
    ids = tokenize_documents(smollm2.tokenizer, [docs[0][1].text], 64)[0]
    with torch.inference_mode():
        out = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        normed = smollm2.model.model.norm(torch.from_numpy(rows.acts[0][last])).numpy()
    ref = out.hidden_states[-1][0, 1:].numpy()
    np.testing.assert_allclose(normed, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_store_settings_mismatch_is_refused(smollm2, tmp_path):
    store = ActivationStore.create(tmp_path / "s", _meta(smollm2))
    with pytest.raises(GLPError, match="split: store has 'train', extraction asks 'val'"):
        extract_to_store(Extractor(smollm2, ExtractConfig(layers=[LAYER], split="val")),
                         fortune_corpus(["riddles"]), store, 10, progress=False)
    assert len(store) == 0
