"""Teacher-forced scoring from the KV cache (the passkey scorer) against full logits."""

import jax
import numpy as np
import pytest

from ringformer import model
from ringformer.generate import Generator
from ringformer.generate.score import continuation_scores
from ringformer.mesh import make_mesh


@pytest.mark.parametrize("smear_tokens", [0, 1, 2])
def test_continuation_scores_match_full_logits(smear_tokens):
    """With smeared keys too (one and two tokens back): the candidates' rows repeat the
    cache's last raw keys and queries."""
    cfg = model.ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, dtype="float32", init_std=0.2,
                            smear_keys=smear_tokens > 0, smear_tokens=max(smear_tokens, 1),
                            attention=model.AttentionConfig(layout="zigzag"))
    params = jax.device_get(model.init_params(cfg, jax.random.PRNGKey(1)))
    gen = Generator(cfg, params, mesh=make_mesh({"dp": 2, "fsdp": 1, "sp": 4, "tp": 1}))
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 259, 40).astype(np.int32)
    # Three candidates share one prompt (one prefill), of two answer lengths; one other prompt.
    rows = [(np.concatenate([prompt, rng.integers(3, 259, n)]).astype(np.int32), 40)
            for n in (5, 5, 3)]
    rows.append((rng.integers(3, 259, 9).astype(np.int32), 2))
    for (ids, start), (logp, best) in zip(rows, continuation_scores(gen, rows), strict=True):
        full = np.asarray(model.logits(cfg, params, ids[None]))[0].astype(np.float64)
        ref = full - full.max(-1, keepdims=True)
        ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        j = np.arange(start, len(ids))
        np.testing.assert_allclose(logp, ref[j - 1, ids[j]], atol=1e-4)
        assert (best == ref[j - 1].argmax(-1)).all()
