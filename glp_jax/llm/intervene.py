"""Edit the residual stream of a live HF causal LM: a forward hook on decoder layer k.

Hook point: the output of decoder layer k (the residual stream after block k), the same
place extraction reads (`glp_jax.llm.extract`). `edit_layer_output` is the generic tool:
an `edit_fn(hidden_BxTxD) -> tensor` replaces the layer's hidden state for the rest of
the forward (delta LM loss replaces masked positions by a reconstruction; steering edits
the last position). `PositionReplacer` is the edit the evaluations use: every masked
position of the batch is gathered into one float32 [N, d] numpy array, the reconstructor
is called once per forward, and the result is scattered back in the LLM's dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from glp_jax.llm.extract import _decoder_layers

EditFn = Callable[[object], object]  # torch.Tensor [B, T, d] -> torch.Tensor [B, T, d]


@contextmanager
def edit_layer_output(model, layer: int, edit_fn: EditFn) -> Iterator[None]:
    """While open, every forward of `model` passes decoder layer `layer`'s hidden state
    through `edit_fn`. Returning the input tensor itself (or None) leaves the forward
    untouched, bit for bit."""
    from glp_jax.errors import GLPError

    blocks = _decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise GLPError(f"layer {layer} is out of range for a model with {len(blocks)} decoder "
                       f"layers (valid: 0..{len(blocks) - 1})")

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = edit_fn(hidden)
        if new is None or new is hidden:
            return None  # keep the module's own output
        if tuple(new.shape) != tuple(hidden.shape):
            raise GLPError(f"edit function returned shape {tuple(new.shape)} for a hidden "
                           f"state of shape {tuple(hidden.shape)}")
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class PositionReplacer:
    """edit_fn: hidden[mask] <- recon(hidden[mask]), one reconstructor call per forward.

    Set `mask` (bool [B, T], torch or numpy) before each forward. When the reconstruction
    equals its input bitwise (the identity), nothing is written back, so the forward is
    bit-identical to an unhooked one. Counters: `calls`, `rows`, `recon_seconds` (inside the
    reconstructor) and `edit_seconds` (gather, copies and scatter around it).
    """

    recon: Callable[[np.ndarray], np.ndarray]
    mask: object = None
    calls: int = field(default=0)
    rows: int = field(default=0)
    recon_seconds: float = field(default=0.0)
    edit_seconds: float = field(default=0.0)

    def __call__(self, hidden):
        import torch

        from glp_jax.errors import GLPError

        t0 = time.perf_counter()
        if self.mask is None:
            raise GLPError("PositionReplacer.mask is not set: assign the [B, T] positions to "
                           "edit before the forward")
        mask = torch.as_tensor(self.mask, device=hidden.device).bool()
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise GLPError(f"edit mask has shape {tuple(mask.shape)} but the hidden state is "
                           f"{tuple(hidden.shape)}")
        n = int(mask.sum())
        if n == 0:
            self.edit_seconds += time.perf_counter() - t0
            return hidden
        rows_NxD = hidden[mask].detach().float().cpu().numpy()
        t1 = time.perf_counter()
        new_NxD = np.asarray(self.recon(rows_NxD))
        t2 = time.perf_counter()
        self.calls += 1
        self.rows += n
        self.recon_seconds += t2 - t1
        if new_NxD.shape != rows_NxD.shape:
            raise GLPError(f"reconstructor {getattr(self.recon, 'name', self.recon)!r} returned "
                           f"shape {new_NxD.shape} for input {rows_NxD.shape}")
        if new_NxD.dtype == rows_NxD.dtype and np.array_equal(new_NxD, rows_NxD):
            out = hidden  # unchanged: keep the forward bit-identical
        else:
            out = hidden.clone()
            out[mask] = torch.from_numpy(np.ascontiguousarray(new_NxD, np.float32)).to(
                device=hidden.device, dtype=hidden.dtype)
        self.edit_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return out


@contextmanager
def replace_positions(model, layer: int, recon) -> Iterator[PositionReplacer]:
    """`with replace_positions(lm.model, k, recon) as rep: rep.mask = m; lm.model(...)`."""
    rep = PositionReplacer(recon)
    with edit_layer_output(model, layer, rep):
        yield rep
