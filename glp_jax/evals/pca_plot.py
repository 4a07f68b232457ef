"""Real vs generated activations on the top-2 principal components (the paper's Figure 3)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from glp_jax.rundir import write_atomic


def top2_pca(x_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [D, 2]) of x in float64, via SVD of the centred data."""
    x = np.asarray(x_NxD, np.float64)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:2].T


def pca_panels(real_NxD: np.ndarray, panels: dict[str, np.ndarray], path, *,
               title: str = "", real_label: str = "real", fake_label: str = "generated",
               max_points: int = 5000, seed: int = 0) -> int:
    """One scatter panel per entry of `panels`, each on the top-2 PCs of the union of the
    real rows and that panel's rows (at most max_points of each). Writes a PNG to `path`
    atomically (Agg backend) and returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)

    def sub(x):
        x = np.asarray(x)
        return x[np.sort(rng.choice(len(x), max_points, replace=False))] if len(x) > max_points \
            else x

    real = sub(real_NxD)
    k = len(panels)
    cols = min(k, 5)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, fake) in zip(axes.ravel(), panels.items(), strict=False):
        fake = sub(fake)
        mu, comps = top2_pca(np.concatenate([real, fake]))
        pr, pf = (real - mu) @ comps, (fake - mu) @ comps
        ax.scatter(pr[:, 0], pr[:, 1], s=2, alpha=0.4, label=real_label, color="tab:blue",
                   rasterized=True)
        ax.scatter(pf[:, 0], pf[:, 1], s=2, alpha=0.4, label=fake_label, color="tab:orange",
                   rasterized=True)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[k:]:
        ax.remove()
    drawn = len(fig.axes)
    fig.axes[0].legend(loc="best", fontsize=7, markerscale=4)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return drawn
