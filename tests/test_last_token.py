"""Last-token features of mixed-length texts against unpadded one-text HF forwards."""

import numpy as np
import pytest
import torch

from glp_jax.errors import GLPError
from glp_jax.llm.extract import tokenize_documents
from glp_jax.llm.last_token import last_token_activations

LAYER = 14
TEXTS = ["A short one.", "Quite a bit longer text, with several more tokens in it than the "
         "others have.", "Medium length here, friend.", "Why?"]


def test_last_token_resid_and_mlp_match_unpadded_forwards(smollm2):
    got = last_token_activations(smollm2, LAYER, TEXTS, batch_size=3, mlp=True)
    assert got["resid"].shape == (4, smollm2.d)
    down = smollm2.model.model.layers[LAYER].mlp.down_proj
    seen = {}
    for j, ids in enumerate(tokenize_documents(smollm2.tokenizer, TEXTS, 2048)):
        seen.clear()
        h = down.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("a", inp[0]))
        try:
            with torch.inference_mode():
                out = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        finally:
            h.remove()
        ref = out.hidden_states[LAYER + 1][0, -1].numpy()
        np.testing.assert_allclose(got["resid"][j], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        mlp_ref = seen["a"][0, -1].numpy()
        np.testing.assert_allclose(got["mlp"][j], mlp_ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(mlp_ref).max())
    # the last token, not a padding position: the longest text sets the batch width
    assert not np.allclose(got["resid"][0], got["resid"][3])


def test_empty_text_is_refused(smollm2):
    with pytest.raises(GLPError, match="no tokens"):
        last_token_activations(smollm2, LAYER, ["fine", ""])
