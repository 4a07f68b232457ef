"""Last-token activations of texts at one decoder layer: what probing and DiffMean read.

For each text (tokenised like extraction: separator/BOS first, right-truncated) the
residual stream after block k at its last token, and optionally the layer's MLP neurons
there (the input of that layer's down projection, `mlp.down_proj`, i.e. act(gate) * up).
Texts are right-padded in batches sorted by length, and the forward stops after layer k.
"""

from __future__ import annotations

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.llm.extract import _decoder_layers, _StopForward, first_attr, tokenize_documents
from glp_jax.progress import progress_bar


def _mlp_down_proj(block):
    return first_attr(block, ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2"),
                      "MLP down projection")


def last_token_activations(lm, layer: int, texts: list[str], *, max_length: int = 2048,
                           batch_size: int = 32, mlp: bool = False,
                           progress: bool = False) -> dict[str, np.ndarray]:
    """{"resid": [N, d]} (+ {"mlp": [N, d_mlp]}) float32 at each text's last token.

    A text whose only token is the separator has no last content token: it is refused
    (pass non-empty texts)."""
    import torch

    ids = tokenize_documents(lm.tokenizer, list(texts), max_length)
    if any(len(t) < 2 for t in ids):
        bad = next(i for i, t in enumerate(ids) if len(t) < 2)
        raise GLPError(f"text {bad} ({texts[bad][:40]!r}) has no tokens; drop empty texts")
    blocks = _decoder_layers(lm.model)
    if not 0 <= layer < len(blocks):
        raise GLPError(f"layer {layer} is out of range (valid: 0..{len(blocks) - 1})")
    order = np.argsort([-len(t) for t in ids], kind="stable")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    device = next(lm.model.parameters()).device
    out: dict[str, list] = {"resid": [None] * len(ids)}
    if mlp:
        out["mlp"] = [None] * len(ids)
    captured: dict[str, object] = {}

    def grab_resid(_m, _i, output):
        captured["resid"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    def grab_mlp(_m, inputs):
        captured["mlp"] = inputs[0]

    handles = [blocks[layer].register_forward_hook(grab_resid)]
    if mlp:
        handles.append(_mlp_down_proj(blocks[layer]).register_forward_pre_hook(grab_mlp))
    try:
        bar = progress_bar(len(ids), "last-token acts", "text", enabled=progress)
        for start in range(0, len(ids), batch_size):
            bar.update(min(batch_size, len(ids) - start))
            rows = order[start:start + batch_size]
            width = max(len(ids[j]) for j in rows)
            inp = np.full((len(rows), width), pad, np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for r, j in enumerate(rows):
                inp[r, : len(ids[j])] = ids[j]
                mask[r, : len(ids[j])] = 1
            captured.clear()
            with torch.inference_mode():
                try:
                    lm.model(input_ids=torch.from_numpy(inp).to(device),
                             attention_mask=torch.from_numpy(mask).to(device), use_cache=False)
                except _StopForward:
                    pass
            last = torch.from_numpy(mask.sum(1) - 1)
            sel = torch.arange(len(rows))
            for key in out:
                vals = captured[key][sel, last.to(captured[key].device)].float().cpu().numpy()
                for r, j in enumerate(rows):
                    out[key][j] = vals[r]
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}
