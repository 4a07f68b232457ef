"""PCA baseline: streamed float64 fit against numpy and scikit-learn, save/load, errors."""

import numpy as np
import pytest
from sklearn.decomposition import PCA as SkPCA

from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import GLPError
from glp_jax.pca import PCA, PCAReconstruction, fit_pca

D = 24


@pytest.fixture(scope="module")
def store_and_rows(tmp_path_factory):
    """Low-rank + noise rows with a large mean (like residual activations), fp32 storage."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((6, D)) * np.linspace(8, 1, 6)[:, None]
    x = (rng.standard_normal((1500, 6)) @ basis + 0.3 * rng.standard_normal((1500, D))
         + 40.0).astype(np.float32)
    path = tmp_path_factory.mktemp("pca") / "s"
    store = ActivationStore.create(path, StoreMeta(model="m", layers=[2], d=D, dtype="float32",
                                                   shard_rows=256, chunk_rows=8))
    store.append({2: x}, np.arange(len(x)), np.arange(len(x)) // 10)
    return store, x.astype(np.float64)


def test_streamed_fit_matches_numpy_float64(store_and_rows):
    store, x = store_and_rows
    pca = fit_pca(store, block_rows=100, progress=False)  # 15 blocks
    cov = np.cov(x, rowvar=False, bias=True)
    w, _ = np.linalg.eigh(cov)
    np.testing.assert_allclose(pca.mean_D, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pca.eigenvalues_D, w[::-1], rtol=1e-9, atol=1e-9 * w.max())
    # Blocks do not change the answer.
    one = fit_pca(store, block_rows=10_000, progress=False)
    np.testing.assert_allclose(one.eigenvalues_D, pca.eigenvalues_D, rtol=1e-9, atol=1e-9)


def test_reconstruction_matches_scikit_learn(store_and_rows):
    store, x = store_and_rows
    pca = fit_pca(store, progress=False)
    for k in (1, 3, 6):
        sk = SkPCA(n_components=k, svd_solver="full").fit(x)
        want = sk.inverse_transform(sk.transform(x))
        got = PCAReconstruction(pca, k)(x.astype(np.float32))
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(x - x.mean(0)).max())
        assert pca.explained_variance_ratio(k) == pytest.approx(
            sk.explained_variance_ratio_.sum(), rel=1e-9)


def test_full_rank_is_identity_and_save_load_round_trip(store_and_rows, tmp_path):
    store, x = store_and_rows
    pca = fit_pca(store, max_rows=1000, progress=False)
    assert pca.info["rows"] == 1000 and pca.info["layer"] == 2
    got = PCAReconstruction(pca, D)(x[:50].astype(np.float32))
    np.testing.assert_allclose(got, x[:50], atol=1e-3)
    again = PCA.load(pca.save(tmp_path / "p"))
    np.testing.assert_array_equal(again.components_DxD, pca.components_DxD)
    assert again.info == pca.info


def test_errors(store_and_rows, tmp_path):
    store, _ = store_and_rows
    pca = fit_pca(store, max_rows=100, progress=False)
    with pytest.raises(GLPError, match="k=0"):
        PCAReconstruction(pca, 0)
    with pytest.raises(GLPError, match="glp pca"):
        PCA.load(tmp_path / "nothing")


def test_recon_metrics_match_sklearn_r2_and_pca_variance_ratio(store_and_rows):
    from sklearn.metrics import r2_score

    from glp_jax.evals.recon import Identity, MeanAblation
    from glp_jax.evals.recon_metrics import evaluate_recon

    store, x = store_and_rows
    pca = fit_pca(store, progress=False)
    res = evaluate_recon({"pca": PCAReconstruction(pca, 3), "id": Identity(),
                          "mean": MeanAblation(x.mean(0))}, x.astype(np.float32))
    want = r2_score(x, PCAReconstruction(pca, 3)(x.astype(np.float32)),
                    multioutput="variance_weighted")
    assert res["pca"]["explained_variance"] == pytest.approx(want, rel=1e-6)
    # On the rows it was fitted on, PCA's explained variance is its eigenvalue ratio.
    assert res["pca"]["explained_variance"] == pytest.approx(pca.explained_variance_ratio(3),
                                                             abs=1e-5)
    assert res["id"]["nmse"] == 0.0 and res["id"]["cosine"] == pytest.approx(1.0)
    assert res["mean"]["explained_variance"] == pytest.approx(0.0, abs=1e-6)
