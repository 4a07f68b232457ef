"""`glp eval recon`: how well each method reconstructs held-out activations (raw space).

normalised MSE = sum |x - x_hat|^2 / sum |x - mean|^2 (mean = per-dimension mean of the
evaluated rows), explained variance = 1 - NMSE, plus the mean cosine similarity. Methods
that have latents (the SAE) add their own statistics (L0, dead latents) through an
optional `latent_stats(rows)` method. All sums in float64.
"""

from __future__ import annotations

import numpy as np

from glp_jax.evals.recon import Reconstructor


def reconstruction_metrics(x_NxD: np.ndarray, recon_NxD: np.ndarray) -> dict:
    x = np.asarray(x_NxD, np.float64)
    r = np.asarray(recon_NxD, np.float64)
    if x.shape != r.shape:
        raise ValueError(f"reconstruction shape {r.shape} differs from the input's {x.shape}")
    err = ((x - r) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    nx, nr = np.linalg.norm(x, axis=1), np.linalg.norm(r, axis=1)
    cos = (x * r).sum(1) / np.maximum(nx * nr, 1e-30)
    nmse = float(err / total) if total > 0 else float("nan")
    return {"mse": float(err / x.size), "nmse": nmse, "explained_variance": 1.0 - nmse,
            "cosine": float(cos.mean()), "n_rows": int(x.shape[0])}


def evaluate_recon(methods: dict[str, Reconstructor], rows_NxD: np.ndarray) -> dict:
    """{method: metrics} on the same rows, plus each method's description."""
    out = {}
    for name, method in methods.items():
        m = reconstruction_metrics(rows_NxD, method(rows_NxD))
        latent_stats = getattr(method, "latent_stats", None)
        if latent_stats is not None:
            m.update(latent_stats(rows_NxD))
        m["describe"] = method.describe()
        out[name] = m
    return out


def recon_markdown(result: dict) -> str:
    lines = ["| method | NMSE | explained variance | cosine | L0 | dead latents |",
             "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        l0 = f"{m['l0']:.1f}" if "l0" in m else "-"
        dead = f"{m['dead_fraction']:.3f}" if "dead_fraction" in m else "-"
        lines.append(f"| {name} | {m['nmse']:.4f} | {m['explained_variance']:.4f} | "
                     f"{m['cosine']:.4f} | {l0} | {dead} |")
    ref = result.get("reference", "")
    ref = ref.get("selection", "") if isinstance(ref, dict) else ref
    return "\n".join(lines) + f"\n\n{result['n_rows']} held-out rows ({ref}).\n"
