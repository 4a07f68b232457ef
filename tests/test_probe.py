"""Probing: the balanced split, the task loaders, GLP meta-neuron features (per-row noise,
last token), the vectorised 1-D probe against sklearn, the bootstrap CI, Table 4 end to end
and the top-activating texts of a meta-neuron."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from sklearn.metrics import roc_auc_score

from glp_jax.api import LoadedGLP
from glp_jax.errors import GLPError
from glp_jax.evals.features import (
    TaskFeatures,
    glp_meta_neurons,
    glp_method,
    mlp_method,
    pca_method,
    raw_method,
    sae_method,
)
from glp_jax.evals.probe import (
    N_BOOT,
    evaluate_probes,
    probe_1d,
    probe_1d_fast,
    probe_1d_sklearn,
    probe_run,
    rank_auc,
    summarize,
)
from glp_jax.evals.probe_data import (
    ProbeTask,
    balanced_split,
    fortune_tasks,
    load_tasks,
    split_sizes,
)
from glp_jax.model import GLP, GLPConfig, Normalizer

LAYER = 14


def random_glp(d, n_layers=2, d_mlp=8, seed=0):
    cfg = GLPConfig(d_input=d, n_layers=n_layers, d_model=32, d_mlp=d_mlp).resolved()
    rng = np.random.default_rng(seed)
    norm = Normalizer.from_moments(rng.standard_normal(d), rng.uniform(0.5, 4.0, d))
    return LoadedGLP(GLP(cfg, rngs=nnx.Rngs(seed)), norm, cfg, [], "random")


# -- split and tasks ------------------------------------------------------------------------------

def test_balanced_split_sizes_balance_and_determinism():
    y = np.repeat([0, 1], 300)
    tr, te = balanced_split(y)
    assert (len(tr), len(te)) == split_sizes(600) == (500, 99)
    assert y[tr].sum() == 250 and abs(y[te].sum() - 49.5) <= 0.5
    assert len(set(tr) | set(te)) == len(tr) + len(te)  # disjoint
    tr2, te2 = balanced_split(y)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(tr, balanced_split(y, seed=1)[0])
    # large task: n_train capped at 1024, 512 per class
    big = np.repeat([0, 1], 1000)
    tr, te = balanced_split(big)
    assert (len(tr), len(te), big[tr].sum()) == (1024, 975, 512)
    # imbalanced: train stays balanced, test takes the rest minus one (from the larger class)
    imb = np.r_[np.zeros(900, int), np.ones(700, int)]
    tr, te = balanced_split(imb)
    assert (len(tr), imb[tr].sum(), len(te), imb[te].sum()) == (1024, 512, 575, 188)
    # too few positives for half the train set: all but one go to train
    few = np.r_[np.zeros(500, int), np.ones(100, int)]
    tr, te = balanced_split(few)
    assert (len(tr), few[tr].sum(), len(te), few[te].sum()) == (500, 99, 99, 1)
    with pytest.raises(GLPError, match="more than"):
        balanced_split(np.repeat([0, 1], 50))


def test_fortune_suite_is_balanced_and_capped():
    tasks = fortune_tasks(max_tasks=2, max_per_task=300)
    assert [t.name for t in tasks] == ["fortune_people", "fortune_definitions"]
    for t in tasks:
        assert len(t.labels) == 300 and t.labels.sum() == 150
        assert (len(t.train_idx), len(t.test_idx)) == (200, 99)
        assert t.y_train.sum() == 100 and all(s.strip() for s in t.texts)
    again = fortune_tasks(max_tasks=2, max_per_task=300)
    assert again[0].texts == tasks[0].texts
    assert len(fortune_tasks(min_count=100)) == 32  # of 43 categories


def test_user_files_csv_and_jsonl(tmp_path):
    rows = [(f"text number {i}", "spam" if i % 3 == 0 else "ham") for i in range(160)]
    rows.append(("   ", "ham"))  # empty: dropped
    with open(tmp_path / "spam.csv", "w") as f:
        f.write("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    with open(tmp_path / "other.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "label": int(lab == "spam")}) + "\n" for t, lab in rows)
    a, b = load_tasks([tmp_path / "spam.csv", tmp_path / "other.jsonl"])
    assert a.name == "spam" and len(a.texts) == 160 and a.info["classes"] == ["ham", "spam"]
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.sum() == 54 and a.y_train.sum() == min(30, 53)


def test_original_layout_loader(tmp_path):
    rng = np.random.default_rng(0)
    d, ys = 12, {}
    for name, with_y in (("task_a", True), ("task_b", False)):
        folder = tmp_path / "probes" / name
        folder.mkdir(parents=True)
        y = ys[name] = rng.permutation(np.repeat([0, 1], 80))
        if with_y:
            xtr, xte = rng.standard_normal((100, 1, d)), rng.standard_normal((40, 1, d))
            torch.save(torch.tensor(xtr, dtype=torch.float32), folder / "X_train.pt")
            torch.save(torch.tensor(xte, dtype=torch.float32), folder / "X_test.pt")
            torch.save(torch.tensor(y[:100]), folder / "y_train.pt")
            torch.save(torch.tensor(y[100:140]), folder / "y_test.pt")
        else:  # labels from the SAE-Probes CSV target + the split
            target = np.where(y == 1, "yes", "no")
            (tmp_path / "probes" / f"{name}.csv").write_text(
                "prompt,target\n" + "".join(f"p{i},{t}\n" for i, t in enumerate(target)))
            ntr, nte = split_sizes(160)
            torch.save(torch.randn(ntr, 1, d), folder / "X_train.pt")
            torch.save(torch.randn(nte, 1, d), folder / "X_test.pt")
    a, b = load_tasks([tmp_path / "probes"])  # the CSV beside task_b is no task of its own
    assert a.name == "task_a" and a.acts.shape == (140, d) and a.texts is None
    np.testing.assert_allclose(a.acts[:100], xtr[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(a.y_train, ys["task_a"][:100])
    np.testing.assert_array_equal(a.test_idx, np.arange(100, 140))
    y_b = ys["task_b"]
    tr, te = balanced_split(y_b)
    np.testing.assert_array_equal(b.labels, np.r_[y_b[tr], y_b[te]])
    assert b.y_train.sum() == 30 and "balanced_split" in b.info["labels_from"]


# -- the 1-D probe ----------------------------------------------------------------------------------

def planted(n=600, F=2000, j=1234, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.standard_normal((n, F)).astype(np.float32)
    x[:, j] += 1.2 * y  # the informative feature
    # a decoy with a larger mean difference carried by a few outliers, and little AUC
    x[:, 7] = rng.standard_normal(n) + np.where((y == 1) & (rng.random(n) < 0.05), 60.0, 0.0)
    tr, te = balanced_split(y)
    return x, y, tr, te


def test_planted_feature_wins_with_the_expected_auc():
    x, y, tr, te = planted()
    win = probe_1d((x[tr], x[te]), y[tr], y[te])
    assert win["feature"] == 1234 and win["rank"] == 1  # the decoy ranks first, loses on AUC
    assert win["test_auc"] == pytest.approx(roc_auc_score(y[te], x[te, 1234]), abs=1e-12)
    assert win["val_auc"] > 0.75 and win["n_candidates"] == 512


def test_vectorised_1d_probe_equals_sklearn():
    """Heavy tails, ties (rounded values), an anti-correlated and a constant feature."""
    rng = np.random.default_rng(1)
    n = 260
    y = (rng.random(n) < 0.45).astype(int)
    x = np.stack([rng.standard_t(2, n) + 0.6 * y, np.round(rng.standard_normal(n) + 0.4 * y, 1),
                  -0.5 * y + rng.standard_normal(n), rng.standard_normal(n),
                  np.ones(n), rng.integers(0, 3, n) + 0.8 * y], 1).astype(np.float32)
    tr, te = np.arange(200), np.arange(200, n)
    fast = probe_1d_fast(x[tr], y[tr], x[te], y[te])
    ref = probe_1d_sklearn(x[tr], y[tr], x[te], y[te])
    np.testing.assert_allclose(fast["fold_auc"], ref["fold_auc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast["val_auc"], ref["val_auc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast["test_auc"], ref["test_auc"], rtol=0, atol=1e-12)
    assert np.allclose(ref["C"], 1e-5)  # every C scores the same; sklearn keeps the first
    want = [roc_auc_score(y[te], x[te, j]) for j in range(x.shape[1])]
    np.testing.assert_allclose(rank_auc(y[te], x[te]), want, atol=1e-12)


def test_bootstrap_ci_is_reproducible_and_equals_numpy():
    from scipy.stats import bootstrap

    from glp_jax.evals.stats import bootstrap_ci as stats_bootstrap_ci

    def bootstrap_ci(v, seed=0):  # probing's settings (probe.summarize)
        return stats_bootstrap_ci(v, seed=seed, n_resamples=N_BOOT)

    v = np.random.default_rng(2).uniform(0.6, 0.95, 17)
    lo, hi = bootstrap_ci(v, seed=5)
    assert (lo, hi) == bootstrap_ci(v, seed=5) and (lo, hi) != bootstrap_ci(v, seed=6)
    assert (lo, hi) == (summarize(dict(enumerate(v)), seed=5)["ci_low"],
                        summarize(dict(enumerate(v)), seed=5)["ci_high"])
    ref = bootstrap((v,), np.mean, n_resamples=10_000, method="percentile",
                    rng=np.random.default_rng(5)).confidence_interval
    assert (lo, hi) == (ref.low, ref.high)
    means = v[np.random.default_rng(5).integers(0, len(v), (10_000, len(v)))].mean(1)
    np.testing.assert_allclose([lo, hi], np.percentile(means, [2.5, 97.5]), rtol=1e-12)
    one = summarize({"t": 0.7})
    assert (one["ci_low"], one["ci_high"], one["t_low"]) == (None, None, None)
    assert bootstrap_ci([0.7, 0.7]) == (0.7, 0.7)


# -- GLP meta-neurons ---------------------------------------------------------------------------

def test_glp_features_per_row_noise_and_layout():
    glp = random_glp(16, n_layers=3, d_mlp=8)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32) * 2
    full = glp_meta_neurons(glp, x, sigma=0.5, seed=3, split="train")
    assert full.shape == (5, 24)
    for i in range(5):  # each row alone, with its row id, gets the same noise
        one = glp_meta_neurons(glp, x[i:i + 1], sigma=0.5, seed=3, split="train", row_ids=[i])
        np.testing.assert_allclose(one[0], full[i], rtol=1e-5, atol=1e-6)
    small_chunks = glp_meta_neurons(glp, x, sigma=0.5, seed=3, split="train", chunk=2)
    np.testing.assert_allclose(small_chunks, full, rtol=1e-5, atol=1e-6)
    cols = np.array([23, 0, 9])
    np.testing.assert_allclose(glp_meta_neurons(glp, x, sigma=0.5, seed=3, cols=cols),
                               full[:, cols], rtol=1e-5, atol=1e-6)
    # test row i does not reuse train row i's noise (the original's bug); seeds matter
    assert not np.allclose(glp_meta_neurons(glp, x, sigma=0.5, seed=3, split="test"), full)
    assert not np.allclose(glp_meta_neurons(glp, x, sigma=0.5, seed=4, split="train"), full)
    # without noise the layout is the API's: feature block * H + unit
    np.testing.assert_allclose(glp_meta_neurons(glp, x, sigma=0.0), glp.encode(x, sigma=0.0),
                               rtol=1e-5, atol=1e-6)


def test_glp_winner_decodes_block_and_unit():
    glp = random_glp(16, n_layers=3, d_mlp=8)
    m = glp_method(glp)
    assert m.decode(2 * 8 + 5) == {"block": 2, "unit": 5} and m.decode(7) == {"block": 0, "unit": 7}
    # a task whose label is one meta-neuron's sign: the probe finds that neuron
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((400, 16)).astype(np.float32) * 2
    tr, te = np.arange(300), np.arange(300, 400)
    probe_feats = np.r_[glp_meta_neurons(glp, acts[tr], sigma=0.1, split="train"),
                        glp_meta_neurons(glp, acts[te], sigma=0.1, split="test")]
    target = 13
    y = (probe_feats[:, target] > np.median(probe_feats[:, target])).astype(int)
    task = ProbeTask("t", y, tr, te, acts=acts)
    feats = TaskFeatures(m, {"resid": acts}, task)
    win = probe_1d(feats, task.y_train, task.y_test)
    assert (win["feature"], win["block"], win["unit"]) == (13, 1, 5)
    assert win["test_auc"] == pytest.approx(1.0)
    # chunked path (nothing cached) gives the same winner and statistic
    lean = TaskFeatures(m, {"resid": acts}, task, cache_bytes=0)
    assert not lean.cache
    np.testing.assert_allclose(lean.mean_diff(task.y_train), feats.mean_diff(task.y_train),
                               rtol=1e-5, atol=1e-6)
    assert probe_1d(lean, task.y_train, task.y_test) == win


def test_glp_features_are_taken_at_the_last_token(smollm2):
    """Mixed-length texts in one batch: the GLP features of each row equal those of the
    text run alone (unpadded HF forward, same row id)."""
    from glp_jax.evals.features import task_inputs
    from glp_jax.llm.extract import tokenize_documents

    texts = ["A short one.", "Quite a bit longer text, with several more tokens in it.", "Why?",
             "Medium length here, friend."]
    glp = random_glp(smollm2.d, n_layers=2, d_mlp=16)
    task = ProbeTask("t", [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 2, 3], texts=texts)
    inputs = task_inputs(task, smollm2, LAYER, batch_size=4)
    feats = TaskFeatures(glp_method(glp, sigma=0.1), inputs, task).matrix("train")
    for i, ids in enumerate(tokenize_documents(smollm2.tokenizer, texts, 512)):
        with torch.inference_mode():
            h = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        resid = h.hidden_states[LAYER + 1][0, -1:].numpy()
        alone = glp_meta_neurons(glp, resid, sigma=0.1, split="train", row_ids=[i])
        np.testing.assert_allclose(feats[i], alone[0], rtol=2e-3, atol=2e-3)
    assert not np.allclose(feats[0], feats[2], atol=1e-2)


# -- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_run(smollm2, tmp_path_factory):
    from glp_jax.data.store import ActivationStore, StoreMeta

    root = tmp_path_factory.mktemp("probe")
    ActivationStore.create(root / "store", StoreMeta(model=smollm2.model_id, layers=[LAYER],
                                                     d=smollm2.d, corpus="fortune", seed=7,
                                                     extra={"val_docs": 50}))
    (root / "run").mkdir()
    (root / "run" / "run.json").write_text(json.dumps({"train_dataset": str(root / "store"),
                                                       "layers": [LAYER]}))
    return root / "run"


def test_probe_run_end_to_end(smollm2, fake_run, tmp_path):
    from glp_jax.pca import PCA
    from glp_jax.sae import LoadedSAE, SAEConfig, TopKSAE

    d = smollm2.d
    glp = random_glp(d, n_layers=2, d_mlp=32)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    PCA(np.zeros(d), np.linspace(2, 1, d), q).save(tmp_path / "pca")
    # questions vs statements: the last token (? or .) gives the answer away in one dimension
    subjects = ["cats", "the weather", "my code", "the train", "this soup", "your plan",
                "the market", "our team", "that film", "the river", "his book", "the lamp"]
    texts = [f"{pre} {sub}{end}" for sub in subjects for pre in
             ("Tell me about", "Think of", "Look at", "Remember", "Consider")
             for end in ("?", ".")]
    path = tmp_path / "question.csv"
    path.write_text("text,label\n" + "".join(f"{t},{int(t.endswith('?'))}\n" for t in texts))
    tasks = [path]
    res = probe_run(fake_run, [tmp_path / "pca"], tasks, glp=glp, lm=smollm2, k=16,
                    max_length=32, out_dir=tmp_path / "out", progress=False, pca_k=8)
    names = ["raw", "mlp", "glp", "pca-k8"]
    assert list(res["auc_1d"]) == names and list(res["auc_dense"]) == names
    for n in names:
        s = res["auc_1d"][n]
        assert s["n_tasks"] == 1 and 0.0 <= s["mean"] <= 1.0 and s["ci_low"] is None
        assert set(s["per_task"]) == {"question"}
    w = res["winners"]["glp"]["question"]
    assert w["feature"] == w["block"] * 32 + w["unit"]
    assert res["dense"]["glp"]["question"]["block"] in (0, 1)
    assert res["auc_1d"]["raw"]["mean"] > 0.9 and res["auc_dense"]["raw"]["mean"] > 0.9
    md = (tmp_path / "out" / "probe.md").read_text()
    assert "| method | 1-D AUC | dense AUC |" in md and "| PCA k=8 |" in md
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["settings"]["layer"] == LAYER

    # the sklearn reference picks the same raw winner on the real features
    from glp_jax.evals.features import task_inputs

    task = load_tasks(tasks)[0]
    inputs = task_inputs(task, smollm2, LAYER, max_length=32, mlp=False)
    feats = TaskFeatures(raw_method(), inputs, task)
    fast = probe_1d(feats, task.y_train, task.y_test, k=4)
    ref = probe_1d(feats, task.y_train, task.y_test, k=4, impl="sklearn")
    assert fast["feature"] == ref["feature"] and fast["rank"] == ref["rank"]
    assert fast["val_auc"] == pytest.approx(ref["val_auc"], abs=1e-12)
    assert fast["test_auc"] == pytest.approx(ref["test_auc"], abs=1e-12)

    # an SAE method and a cached-activation task (no texts: MLP neurons are skipped)
    cfg = SAEConfig(d_input=d, width=64, k=8).resolved()
    sae = LoadedSAE(TopKSAE(cfg, rngs=nnx.Rngs(0)).arrays(), glp.normalizer, cfg, "random")
    cached = ProbeTask("cached", task.labels, task.train_idx, task.test_idx, acts=inputs["resid"])
    out = evaluate_probes([cached], [raw_method(), mlp_method(), sae_method(sae),
                                     pca_method(PCA.load(tmp_path / "pca"), 8)],
                          k=16, dense=False, progress=False)
    assert out["skipped"] == {"mlp": ["cached"]} and out["auc_1d"]["mlp"]["n_tasks"] == 0
    assert out["auc_1d"]["raw"]["per_task"]["cached"] == res["auc_1d"]["raw"]["per_task"][
        "question"]
    assert "auc_dense" not in out and 0 <= out["auc_1d"]["sae"]["mean"] <= 1


def test_top_activating_texts(smollm2):
    from glp_jax.evals.neuron import top_activating
    from glp_jax.llm.extract import tokenize_documents

    glp = random_glp(smollm2.d, n_layers=2, d_mlp=16)
    texts = ["The cat sat on the mat.", "Linux is a free operating system kernel.",
             "Why?", "Colourless green ideas sleep furiously, said Chomsky in 1957."]
    rows, md = top_activating(None, 1, 3, texts=texts, top=3, lm=smollm2, glp=glp,
                              layer=LAYER, batch_size=3, progress=False)
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["activation"] >= rows[1]["activation"] >= rows[2]["activation"]
    assert len({r["doc"] for r in rows}) == 3 and all(r["position"] >= 1 for r in rows)
    assert "⟦" in rows[0]["snippet"] and "| rank | activation |" in md
    # the reported activation is that token's meta-neuron in an unpadded forward
    r = rows[0]
    ids = tokenize_documents(smollm2.tokenizer, [texts[r["doc"]]], 64)[0]
    with torch.inference_mode():
        h = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    resid = h.hidden_states[LAYER + 1][0, r["position"]:r["position"] + 1].numpy()
    want = glp_meta_neurons(glp, resid, sigma=0.1, split="neuron",
                            row_ids=[r["doc"] * 64 + r["position"]], cols=[16 + 3])
    assert r["activation"] == pytest.approx(float(want[0, 0]), rel=2e-3, abs=2e-3)
