"""Batched greedy generation with a residual-stream edit at the last position of every forward,
and the per-token NLL of continuations: the LLM side of on-manifold steering.

Generation is a plain loop over `model(...)` with the KV cache (no `generate`), so what the
edit sees is explicit: prompts are LEFT-padded, so at prefill column -1 is every row's last
prompt token; each later forward holds exactly one position, the newest token. The edit
(`LastPositionEdit`, hooked on decoder layer k via `edit_layer_output`) rewrites only that
column: a' = post(a + alpha_b * w), alpha per row, `post` an optional reconstructor on
float32 numpy rows (GLP projection, SAE) called once per forward. Position ids follow the
attention mask (the cumulative count of real tokens), so a left-padded row sees the same
positions as the same prompt alone. Rows are batched longest prompt first.

Greedy decoding is deterministic; every row runs `max_new_tokens` steps unless all rows of
its batch have emitted an EOS. A continuation is cut after its first EOS (kept, so it always
holds >= 1 token and its NLL is defined).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.llm.intervene import edit_layer_output


def pad_id_of(tokenizer) -> int:
    from glp_jax.llm.extract import document_separator_id

    pad = getattr(tokenizer, "pad_token_id", None)
    return document_separator_id(tokenizer) if pad is None else int(pad)


def eos_ids_of(lm) -> set[int]:
    """EOS ids of the generation config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update(int(x) for x in (e if isinstance(e, list | tuple) else [e]))
    return ids


def _cache_arg(model) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (older): the KV cache's name in
    forward's arguments and outputs."""
    import inspect

    return ("cache" if "cache" in inspect.signature(type(model).forward).parameters
            else "past_key_values")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T], attention mask [B, T]) int64, each row right-aligned."""
    if not rows or min(len(r) for r in rows) < 1:
        raise GLPError("every prompt needs >= 1 token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = list(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class LastPositionEdit:
    """edit_fn for `edit_layer_output`: h[:, -1] <- post(h[:, -1] + alpha_B[:, None] * w).

    `alpha_B` (a float or one value per row of the current batch) is set by the generator
    before each batch. Arithmetic is float32; the result is cast back to the LLM's dtype.
    Counters: `calls` (forwards edited), `rows`, `post_seconds` (inside `post`),
    `edit_seconds` (the rest of the edit), and `widths` (T of each edited forward: the prompt
    width at prefill, then 1 under the KV cache)."""

    w_D: np.ndarray
    alpha_B: object = 0.0
    post: Callable[[np.ndarray], np.ndarray] | None = None
    calls: int = field(default=0)
    rows: int = field(default=0)
    post_seconds: float = field(default=0.0)
    edit_seconds: float = field(default=0.0)
    widths: list = field(default_factory=list)

    def __call__(self, hidden):
        import torch

        t0 = time.perf_counter()
        b, t, d = hidden.shape
        w = torch.as_tensor(np.asarray(self.w_D, np.float32), device=hidden.device)
        if w.shape != (d,):
            raise GLPError(f"steering direction has shape {tuple(w.shape)}, the hidden state "
                           f"has d={d}")
        alpha = np.broadcast_to(np.asarray(self.alpha_B, np.float32), (b,))
        alpha = torch.as_tensor(alpha.copy(), device=hidden.device)
        last = hidden[:, -1, :].float() + alpha[:, None] * w
        t_post = 0.0
        if self.post is not None:
            rows = last.detach().cpu().numpy()
            t1 = time.perf_counter()
            new = np.asarray(self.post(rows), np.float32)
            t_post = time.perf_counter() - t1
            if new.shape != rows.shape:
                raise GLPError(f"reconstructor {getattr(self.post, 'name', self.post)!r} "
                               f"returned shape {new.shape} for input {rows.shape}")
            last = torch.from_numpy(np.ascontiguousarray(new)).to(hidden.device)
        out = hidden.clone()
        out[:, -1, :] = last.to(hidden.dtype)
        self.calls += 1
        self.rows += b
        self.widths.append(t)
        self.post_seconds += t_post
        self.edit_seconds += time.perf_counter() - t0 - t_post
        return out


@dataclass
class Generation:
    """Continuations (token ids, cut after the first EOS) in prompt order, and timings."""

    tokens: list[list[int]]
    seconds: float
    forward_tokens: int  # new tokens computed (rows x steps, incl. rows already finished)
    post_seconds: float = 0.0
    edit_seconds: float = 0.0

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def llm_seconds(self) -> float:
        return self.seconds - self.post_seconds - self.edit_seconds


def greedy_generate(lm, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 20,
                    batch_size: int = 16, layer: int | None = None,
                    edit: Callable | None = None, alphas: Sequence[float] | None = None,
                    stop_at_eos: bool = True, bar=None) -> Generation:
    """Greedy continuations of token-id prompts (each as the model should see it, BOS/
    separator included), `batch_size` rows per forward, left-padded, KV cache.

    With `edit` (e.g. a LastPositionEdit) hooked at decoder layer `layer`, every forward's
    last position is edited; `alphas` (one per prompt) is copied into `edit.alpha_B` for
    each batch. `bar`: a tqdm bar advanced by the rows of each forward."""
    import torch

    if max_new_tokens < 1 or batch_size < 1:
        raise GLPError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, "
                       f"{batch_size}")
    if edit is not None and layer is None:
        raise GLPError("an edit needs the decoder layer to hook (layer=)")
    if alphas is not None and len(alphas) != len(prompts):
        raise GLPError(f"{len(alphas)} alphas for {len(prompts)} prompts")
    model = lm.model
    device = next(model.parameters()).device
    pad, eos = pad_id_of(lm.tokenizer), eos_ids_of(lm)
    eos_t = torch.tensor(sorted(eos) or [-1], device=device)
    cache_arg = _cache_arg(model)
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    post0 = getattr(edit, "post_seconds", 0.0)
    edit0 = getattr(edit, "edit_seconds", 0.0)
    forward_tokens = 0
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    hook = edit_layer_output(model, layer, edit) if edit is not None else nullcontext()
    try:
        with torch.inference_mode(), hook:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if alphas is not None:
                    edit.alpha_B = np.asarray(alphas, np.float32)[idx]
                ids, mask = left_pad([prompts[i] for i in idx], pad)
                ids_t = torch.from_numpy(ids).to(device)
                mask_t = torch.from_numpy(mask).to(device)
                pos_t = (mask_t.cumsum(1) - 1).clamp(min=0)
                res = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t,
                            use_cache=True, logits_to_keep=1)
                nxt = res.logits[:, -1].argmax(-1)
                steps, done = [nxt], torch.isin(nxt, eos_t)
                last_pos = pos_t[:, -1]
                forward_tokens += len(idx)
                if bar is not None:
                    bar.update(len(idx))
                for _ in range(max_new_tokens - 1):
                    if stop_at_eos and bool(done.all()):
                        break
                    mask_t = torch.cat([mask_t, mask_t.new_ones((len(idx), 1))], 1)
                    last_pos = last_pos + 1
                    res = model(input_ids=nxt[:, None], attention_mask=mask_t,
                                position_ids=last_pos[:, None], use_cache=True, logits_to_keep=1,
                                **{cache_arg: getattr(res, cache_arg)})
                    nxt = res.logits[:, -1].argmax(-1)
                    steps.append(nxt)
                    done |= torch.isin(nxt, eos_t)
                    forward_tokens += len(idx)
                    if bar is not None:
                        bar.update(len(idx))
                gen = torch.stack(steps, 1).cpu().numpy()
                for r, i in enumerate(idx):
                    toks = gen[r].tolist()
                    if stop_at_eos:
                        cut = next((j for j, tk in enumerate(toks) if tk in eos), None)
                        toks = toks if cut is None else toks[:cut + 1]
                    out[i] = toks
    finally:
        model.train(was_training)
    return Generation(out, time.perf_counter() - t_start, forward_tokens,
                      getattr(edit, "post_seconds", 0.0) - post0,
                      getattr(edit, "edit_seconds", 0.0) - edit0)


def continuation_nll(lm, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                     *, batch_size: int = 16) -> np.ndarray:
    """Mean negative log-likelihood per token (nats, float64 [N]) of each continuation given
    its prompt, under `lm` as it is (run it without hooks for the unsteered model).

    Token ids are concatenated (prompt + continuation), never re-tokenised from strings, and
    scored in one left-padded forward per batch (position ids from the mask, as in
    generation); only the continuation's tokens count, and only their logits are computed."""
    import torch
    import torch.nn.functional as F

    if len(prompts) != len(continuations):
        raise GLPError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prompts):
        raise GLPError("every prompt and continuation needs >= 1 token")
    model = lm.model
    device = next(model.parameters()).device
    pad = pad_id_of(lm.tokenizer)
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    out = np.zeros(len(seqs), np.float64)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # left-padded, so every continuation ends at column -1 and only the last
            # (longest continuation + 1) positions need logits
            ids, mask = left_pad([seqs[i] for i in idx], pad)
            n_c = np.array([len(continuations[i]) for i in idx])
            keep = int(n_c.max()) + 1
            ids_t = torch.from_numpy(ids).to(device)
            mask_t = torch.from_numpy(mask).to(device)
            logits = model(input_ids=ids_t, attention_mask=mask_t,
                           position_ids=(mask_t.cumsum(1) - 1).clamp(min=0), use_cache=False,
                           logits_to_keep=keep).logits[:, :-1]  # predicts the last keep-1
            labels = ids_t[:, -(keep - 1):]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 labels.reshape(-1), reduction="none")
            ce = ce.view(len(idx), keep - 1).double().cpu().numpy()
            scored = np.arange(keep - 1)[None, :] >= (keep - 1 - n_c)[:, None]
            out[idx] = (ce * scored).sum(1) / n_c
    return out
