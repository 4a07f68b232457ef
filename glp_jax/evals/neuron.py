"""Top-activating texts of one GLP meta-neuron (block B, unit U), as the original's
`integrations/meta_neurons/meta_neurons.py` inspects them.

Documents: the held-out split of the run's training corpus (the store's corpus, seed and
val_docs: the same documents delta LM loss uses), or given texts; tokenised like extraction
(separator/BOS first) and truncated to `max_length` (64 as the original). Every token
position except the BOS and padding is encoded: the residual after the run's layer goes
through the GLP at noise level sigma (0.1 as the original), each token with its own noise
key (seed, "neuron", doc * max_length + position), and only column B * H + U is kept.
Each document counts once, at its most active token (the original reports the top 20
documents per unit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.progress import progress_bar

RESULT_NAME = "neuron"


def _snippet(tokenizer, ids, pos: int, before: int, after: int) -> tuple[str, str]:
    """(text around the token with the token in ⟦ ⟧, the token's text)."""
    left = tokenizer.decode(ids[max(1, pos - before):pos])
    tok = tokenizer.decode(ids[pos:pos + 1])
    right = tokenizer.decode(ids[pos + 1:pos + 1 + after])
    return f"{left}⟦{tok}⟧{right}", tok


def check_unit(glp, block: int, unit: int) -> None:
    L, H = glp.config.n_layers, glp.config.d_mlp
    if not (0 <= block < L and 0 <= unit < H):
        raise GLPError(f"meta-neuron (block {block}, unit {unit}) out of range: the GLP has "
                       f"{L} blocks of {H} units")


def neuron_activations(lm, layer: int, glp, sequences, block: int, unit: int, *,
                       sigma: float = 0.1, seed: int = 0, batch_size: int = 32,
                       progress: bool = False) -> np.ndarray:
    """Activation [N, T] of meta-neuron (block, unit) at every position (NaN at the BOS and
    at padding)."""
    import torch

    from glp_jax.evals.features import glp_meta_neurons
    from glp_jax.llm.extract import TruncatedForward

    H = int(glp.config.d_mlp)
    check_unit(glp, block, unit)
    col = np.array([block * H + unit])
    ids, mask = sequences.input_ids, sequences.attention_mask
    n, T = ids.shape
    out = np.full((n, T), np.nan, np.float32)
    fwd = TruncatedForward(lm.model, [layer])
    device = next(lm.model.parameters()).device
    multi = len(getattr(glp, "layers", [])) > 1 or glp.config.is_multi_layer
    for s in progress_bar(range(0, n, batch_size), "meta-neuron", "batch", enabled=progress):
        rows = np.arange(s, min(n, s + batch_size))
        width = int(mask[rows].sum(1).max())
        resid = fwd(torch.from_numpy(ids[rows, :width]).to(device),
                    torch.from_numpy(mask[rows, :width]).to(device))[layer]
        valid = mask[rows, :width].astype(bool).copy()
        valid[:, 0] = False  # the BOS / attention sink, which the GLP never saw
        r, p = np.nonzero(valid)
        x = resid.float().cpu().numpy()[r, p]
        act = glp_meta_neurons(glp, x, sigma=sigma, seed=seed, split="neuron",
                               row_ids=(rows[r] * T + p), cols=col,
                               layer=layer if multi else None)
        out[rows[r], p] = act[:, 0]
    return out


def top_activating(run_dir, block: int, unit: int, *, n_docs: int = 1024, top: int = 20,
                   sigma: float = 0.1, seed: int = 0, texts=None, max_length: int = 64,
                   batch_size: int = 32, lm=None, glp=None, layer: int | None = None,
                   step="latest", device: str = "cpu", context: int = 12,
                   out_dir=None, progress: bool = True) -> tuple[list[dict], str]:
    """(the `top` documents where meta-neuron (block, unit) fires most, Markdown). Each row:
    rank, activation, doc, position, token, snippet (the token in ⟦ ⟧). Writes
    neuron_b{B}_u{U}.{json,md} to `out_dir` when given."""
    from glp_jax.evals.delta_lm import Sequences, sequences_of_run
    from glp_jax.evals.run_llm import run_llm_and_layer
    from glp_jax.llm.extract import document_separator_id, tokenize_documents

    if glp is None:  # the GLP and the unit are checked before the (slower) LLM load
        from glp_jax.api import LoadedGLP, load

        glp = load(run_dir, step=step)
        if not isinstance(glp, LoadedGLP):
            raise GLPError(f"{run_dir} is not a GLP run (an SAE has no meta-neurons)")
    check_unit(glp, block, unit)
    if lm is None or layer is None:
        name, layer = run_llm_and_layer(run_dir, layer)
    if lm is None:
        from glp_jax.llm.loading import load_causal_lm

        lm = load_causal_lm(name, dtype="float32", device=device)
    if texts is None:
        seqs = sequences_of_run(run_dir, lm.tokenizer, n=n_docs, length=max_length)
        source = dict(seqs.source)
    else:
        toks = [t for t in tokenize_documents(lm.tokenizer, [str(x) for x in texts], max_length)]
        keep = [i for i, t in enumerate(toks) if len(t) >= 2]
        if not keep:
            raise GLPError("no text has a token besides the BOS")
        pad = lm.tokenizer.pad_token_id
        pad = document_separator_id(lm.tokenizer) if pad is None else int(pad)
        seqs = Sequences.from_token_lists([toks[i] for i in keep], max_length, pad)
        source = {"texts": len(texts)}
        keep_idx = np.asarray(keep)
    acts = neuron_activations(lm, layer, glp, seqs, block, unit, sigma=sigma, seed=seed,
                              batch_size=batch_size, progress=progress)
    best_pos = np.nanargmax(acts, axis=1)
    best = acts[np.arange(len(acts)), best_pos]
    order = np.argsort(-best, kind="stable")[:top]
    rows = []
    for rank, d in enumerate(order, 1):
        ids = seqs.input_ids[d, : int(seqs.attention_mask[d].sum())].tolist()
        snippet, tok = _snippet(lm.tokenizer, ids, int(best_pos[d]), context, 4)
        rows.append({"rank": rank, "activation": float(best[d]),
                     "doc": int(d if texts is None else keep_idx[d]),
                     "position": int(best_pos[d]), "token": tok, "snippet": snippet})
    info = {"run": str(run_dir), "block": int(block), "unit": int(unit), "sigma": sigma,
            "seed": seed, "layer": layer, "model": lm.model_id, "n_docs": int(len(acts)),
            "max_length": max_length, "documents": source,
            "mean_activation": float(np.nanmean(acts)), "std_activation": float(np.nanstd(acts))}
    md = neuron_markdown(rows, info)
    if out_dir is not None:
        from glp_jax.rundir import write_results

        write_results(Path(out_dir), f"{RESULT_NAME}_b{block}_u{unit}", {**info, "top": rows}, md)
    return rows, md


def neuron_markdown(rows: list[dict], info: dict) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\r", "").replace("\n", "⏎")

    lines = [f"# Meta-neuron block {info['block']} unit {info['unit']} ({info['model']} layer "
             f"{info['layer']}, sigma {info['sigma']})", "",
             f"Top {len(rows)} of {info['n_docs']} documents by their most active token "
             f"(all tokens: mean {info['mean_activation']:.4g}, std "
             f"{info['std_activation']:.4g}).", "",
             "| rank | activation | doc | token | context |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['activation']:.4g} | {r['doc']} | "
                     f"`{esc(r['token']).replace('`', '')}` | {esc(r['snippet'])} |")
    return "\n".join(lines) + "\n"
