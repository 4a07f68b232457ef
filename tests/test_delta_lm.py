"""Delta LM loss on the real SmolLM2 (layer 14) and a handful of fortune documents: the
identity is exactly free, mean ablation matches an independent torch computation, padding
and position 0 are excluded, the reconstructor is called once per batch."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glp_jax.errors import GLPError
from glp_jax.evals.delta_lm import (
    Sequences,
    delta_lm_of_run,
    evaluate_delta_lm,
    heldout_sequences,
    sequences_of_run,
    summarize_delta_lm,
)
from glp_jax.evals.recon import Identity, MeanAblation, ZeroAblation
from glp_jax.llm.extract import document_separator_id
from glp_jax.llm.intervene import PositionReplacer, edit_layer_output

LAYER, N_SEQS, LENGTH = 14, 6, 24


@pytest.fixture(scope="module")
def seqs(smollm2):
    return heldout_sequences(smollm2.tokenizer, "fortune", n=N_SEQS, length=LENGTH)


@pytest.fixture(scope="module")
def mean_D(smollm2, seqs):
    """A plausible mean: the average layer-14 activation of the sequences (non-BOS)."""
    acts = []

    def grab(_m, _i, out):
        acts.append((out[0] if isinstance(out, tuple) else out).clone())

    h = smollm2.model.model.layers[LAYER].register_forward_hook(grab)
    with torch.inference_mode():
        smollm2.model(input_ids=torch.from_numpy(seqs.input_ids),
                      attention_mask=torch.from_numpy(seqs.attention_mask))
    h.remove()
    mask = seqs.attention_mask.astype(bool).copy()
    mask[:, 0] = False
    return acts[0].numpy()[mask].mean(0).astype(np.float32)


def run(lm, methods, seqs, **kw):
    return evaluate_delta_lm(lm, LAYER, methods, seqs, progress=False, **kw)


class Recorder:
    """Identity that records the rows it was given."""

    name = "recorder"

    def __init__(self):
        self.batches = []

    def __call__(self, x):
        self.batches.append(np.array(x))
        return np.asarray(x, np.float32)

    def describe(self):
        return {"method": self.name}


def test_heldout_sequences_start_with_the_separator_and_are_right_padded(smollm2, seqs):
    sep = document_separator_id(smollm2.tokenizer)
    assert len(seqs) == N_SEQS and seqs.length == LENGTH
    assert (seqs.input_ids[:, 0] == sep).all()
    assert (seqs.lengths >= 2).all() and (seqs.lengths <= LENGTH).all()
    assert len(set(seqs.lengths.tolist())) > 1  # the padding tests need unequal lengths
    with pytest.raises(GLPError, match="right-padded"):
        Sequences(seqs.input_ids, seqs.attention_mask[:, ::-1])


def test_identity_is_exactly_free_and_bit_identical(smollm2, seqs):
    r = run(smollm2, {"identity": Identity()}, seqs, batch_size=4)
    assert r["delta"]["identity"] == 0.0 and r["delta_token_weighted"]["identity"] == 0.0
    assert r["loss"]["identity"] == r["base_loss"]
    ids, mask = torch.from_numpy(seqs.input_ids), torch.from_numpy(seqs.attention_mask)
    with torch.inference_mode():
        plain = smollm2.model(input_ids=ids, attention_mask=mask).logits
        rep = PositionReplacer(Identity(), mask=mask.bool())
        with edit_layer_output(smollm2.model, LAYER, rep):
            hooked = smollm2.model(input_ids=ids, attention_mask=mask).logits
    assert rep.calls == 1 and torch.equal(plain, hooked)


def _independent_losses(lm, seqs, mean_D):
    """One document at a time, no padding: a plain hook writes the mean at positions 1..,
    torch's own mean-reduced cross-entropy gives the per-document loss."""
    mean = torch.from_numpy(mean_D)

    def ablate(_m, _i, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[:, 1:] = mean
        return (h, *out[1:]) if isinstance(out, tuple) else h

    base, ablated, counts = [], [], []
    for ids, n in zip(seqs.input_ids, seqs.lengths, strict=True):
        x = torch.from_numpy(ids[None, :n])
        with torch.inference_mode():
            base.append(F.cross_entropy(lm.model(input_ids=x).logits[0, :-1], x[0, 1:]).item())
            h = lm.model.model.layers[LAYER].register_forward_hook(ablate)
            try:
                ablated.append(F.cross_entropy(lm.model(input_ids=x).logits[0, :-1],
                                               x[0, 1:]).item())
            finally:
                h.remove()
        counts.append(n - 1)
    return np.array(base), np.array(ablated), np.array(counts)


def test_mean_ablation_matches_an_independent_computation(smollm2, seqs, mean_D):
    r = run(smollm2, {"mean": MeanAblation(mean_D)}, seqs, batch_size=4)
    base, ablated, counts = _independent_losses(smollm2, seqs, mean_D)
    np.testing.assert_allclose(r["base_loss"], base.mean(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(r["loss"]["mean"], ablated.mean(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(r["delta"]["mean"], ablated.mean() - base.mean(), atol=1e-5)
    tw = lambda v: (v * counts).sum() / counts.sum()  # noqa: E731
    np.testing.assert_allclose(r["loss_token_weighted"]["mean"], tw(ablated), atol=1e-5)
    np.testing.assert_allclose(r["base_loss_token_weighted"], tw(base), atol=1e-5)
    assert r["n_tokens"] == counts.sum() and r["n_sequences"] == N_SEQS
    assert r["delta"]["mean"] > 0.5


def test_padding_is_never_averaged_in(smollm2, seqs):
    methods = lambda: {"zero": ZeroAblation()}  # noqa: E731
    one_by_one = run(smollm2, methods(), seqs, batch_size=1)  # no padding at all
    batched = run(smollm2, methods(), seqs, batch_size=N_SEQS)  # unequal padding
    lists = [ids[:n].tolist() for ids, n in zip(seqs.input_ids, seqs.lengths, strict=True)]
    wide = Sequences.from_token_lists(lists, length=3 * LENGTH, pad_id=seqs.pad_id)
    untrimmed = run(smollm2, methods(), wide, batch_size=N_SEQS, trim_padding=False)
    for r in (batched, untrimmed):
        for key in ("base_loss", "base_loss_token_weighted"):
            np.testing.assert_allclose(r[key], one_by_one[key], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r["loss"]["zero"], one_by_one["loss"]["zero"], atol=1e-5)
    # Averaging padding in as zeros (the original's bug) would shrink the wide losses ~3x.
    assert untrimmed["base_loss"] > 0.9 * one_by_one["base_loss"]


def test_position_zero_is_never_edited_and_one_call_per_batch(smollm2, seqs):
    rec = Recorder()
    r = run(smollm2, {"rec": rec}, seqs, batch_size=4)
    assert len(rec.batches) == -(-N_SEQS // 4)  # one reconstructor call per forward
    assert sum(len(b) for b in rec.batches) == int((seqs.lengths - 1).sum())
    assert r["timing"]["rec"]["recon_calls"] == len(rec.batches)
    # Position 0 is the attention sink: its residual norm is ~100x the others.
    norms = np.concatenate([np.linalg.norm(b, axis=1) for b in rec.batches])
    assert norms.max() < 10 * np.median(norms)

    # Zeroing position 0 would change the loss a lot ...
    ids, mask = torch.from_numpy(seqs.input_ids), torch.from_numpy(seqs.attention_mask)
    only_bos = torch.zeros_like(mask, dtype=torch.bool)
    only_bos[:, 0] = True
    with torch.inference_mode():
        plain = smollm2.model(input_ids=ids, attention_mask=mask).logits
        with edit_layer_output(smollm2.model, LAYER, PositionReplacer(ZeroAblation(), only_bos)):
            bos_zeroed = smollm2.model(input_ids=ids, attention_mask=mask).logits
    valid = mask[:, 1:].bool()
    ce = lambda lg: F.cross_entropy(lg[:, :-1][valid], ids[:, 1:][valid]).item()  # noqa: E731
    assert ce(bos_zeroed) - ce(plain) > 0.1

    # ... but a method that zeroes every sink-sized row it is given changes nothing.
    class ZeroSinks(Recorder):
        def __call__(self, x):
            x = np.array(x, np.float32)
            x[np.linalg.norm(x, axis=1) > 10 * np.median(norms)] = 0
            return x

    assert run(smollm2, {"sinks": ZeroSinks()}, seqs, batch_size=4)["delta"]["sinks"] == 0.0


def test_zero_ablation_hurts_and_reports_are_written(smollm2, seqs, tmp_path):
    r = run(smollm2, {"zero": ZeroAblation(), "identity": Identity()}, seqs, batch_size=3,
            out_dir=tmp_path)
    assert r["delta"]["zero"] > 2.0
    saved = json.loads((tmp_path / "delta_lm.json").read_text())
    assert saved["delta"] == r["delta"] and saved["layer"] == LAYER
    assert saved["methods"]["zero"] == {"method": "zero-ablation"}
    assert {"seconds", "tokens_per_s", "recon_fraction", "timing", "length"} <= saved.keys()
    md = (tmp_path / "delta_lm.md").read_text()
    assert "| method | delta LM loss |" in md and "| zero |" in md
    line = summarize_delta_lm(r)
    assert "zero +" in line and "\n" not in line


def test_sequences_of_run_use_the_training_split(smollm2, tmp_path):
    from glp_jax.data.store import ActivationStore, StoreMeta

    def fake_run(name, corpus):
        store = tmp_path / f"{name}_store"
        ActivationStore.create(store, StoreMeta(model=smollm2.model_id, layers=[LAYER],
                                                d=smollm2.d, corpus=corpus, seed=7,
                                                extra={"val_docs": 50}))
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"train_dataset": str(store),
                                                              "layers": [LAYER]}))
        return tmp_path / name

    got = sequences_of_run(fake_run("ok", "fortune"), smollm2.tokenizer, n=3, length=16)
    want = heldout_sequences(smollm2.tokenizer, "fortune", n=3, length=16, seed=7, val_docs=50)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    other = heldout_sequences(smollm2.tokenizer, "fortune", n=3, length=16, seed=8, val_docs=50)
    assert not np.array_equal(got.input_ids, other.input_ids)
    with pytest.raises(GLPError, match="heldout_sequences"):
        sequences_of_run(fake_run("gone", str(tmp_path / "missing.txt")), smollm2.tokenizer)
    with pytest.raises(GLPError, match="unknown delta-lm method"):
        delta_lm_of_run(tmp_path / "ok", methods=["pca"], lm=smollm2, write=False)


def test_glp_projection_is_reproducible(smollm2, seqs):
    """A (random-init, small) GLP through the real hook: finite, one call per batch, and a
    fresh GLPProjection with the same seed gives the same numbers bit for bit."""
    from flax import nnx

    from glp_jax.api import LoadedGLP
    from glp_jax.evals.recon import GLPProjection
    from glp_jax.model import GLP, GLPConfig, Normalizer

    d = smollm2.d
    cfg = GLPConfig(d_input=d, n_layers=1, d_model=64, d_mlp=128).resolved()
    glp = LoadedGLP(GLP(cfg, rngs=nnx.Rngs(0)),
                    Normalizer.from_moments(np.zeros(d), np.full(d, 25.0)), cfg, [], "random")
    a, b = (run(smollm2, {"glp": GLPProjection(glp, seed=3)}, seqs, batch_size=4)
            for _ in range(2))
    assert np.isfinite(a["delta"]["glp"]) and a["delta"]["glp"] != 0.0
    assert a["delta"] == b["delta"] and a["loss_token_weighted"] == b["loss_token_weighted"]
    assert a["timing"]["glp"]["recon_calls"] == -(-N_SEQS // 4)
    assert a["methods"]["glp"]["sigma0"] == 0.5
