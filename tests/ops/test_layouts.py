"""Sequence layouts: permutations, their inverses, and exact causal attention in every layout."""

import numpy as np
import pytest

from ringformer.attention import attention, attention_in_layout, tile_counts
from ringformer.ops import layouts as layout
from tests.test_attention import make_inputs, mesh_of, reference, rel_err, value_and_grads


@pytest.mark.parametrize("name", layout.LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_permute_and_unpermute_are_inverses(name, n):
    x = np.arange(3 * 64).reshape(3, 64)
    y = layout.permute(x, name, n, axis=1)
    assert sorted(y[0].tolist()) == list(range(64))
    np.testing.assert_array_equal(layout.unpermute(y, name, n, axis=1), x)


@pytest.mark.parametrize("name", layout.LAYOUTS)
def test_local_token_index_matches_the_permutation(name):
    n, seq = 4, 32
    perm = layout.permutation(name, seq, n).reshape(n, -1)
    for dev in range(n):
        np.testing.assert_array_equal(np.asarray(layout.local_token_index(name, seq // n, n, dev)),
                                      perm[dev])


@pytest.mark.parametrize("name", layout.LAYOUTS)
def test_one_device_keeps_natural_order_for_any_length(name):
    # A model configured for zigzag must still run unsharded on odd lengths (mesh=None, sp=1).
    np.testing.assert_array_equal(layout.permutation(name, 9, 1), np.arange(9))
    q, k, v, dout, seg = make_inputs(s=9, seed=3)
    out = attention_in_layout(q, k, v, mesh=None, impl="blockwise", layout=name, segment_ids=seg,
                              q_chunk=3, kv_chunk=3)
    assert rel_err(out, reference(q, k, v, dout, causal=True, seg=seg)[0]) < 1e-5


def test_layouts_place_tokens_as_documented():
    assert layout.permutation("striped", 8, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert layout.permutation("zigzag", 8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


@pytest.mark.parametrize("name", ["striped", "zigzag"])
def test_ring_is_exact_in_every_layout(name):
    """Tile skipping follows true token positions: nothing needed is skipped in any layout."""
    q, k, v, dout, seg = make_inputs(s=64)
    ref_out, ref_grads = reference(q, k, v, dout, causal=True, seg=seg)
    mesh = mesh_of(sp=4, dp=2)

    def fn(q, k, v):
        return attention(q, k, v, mesh=mesh, segment_ids=seg, q_chunk=4, kv_chunk=4, layout=name)

    out, grads = value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5


def test_balanced_layouts_even_out_the_ring_steps():
    n, seq, chunk = 8, 8 * 64, 8
    # Each ring step lasts as long as its busiest device.
    def max_over_mean(counts):
        return counts.max(axis=1).sum() / counts.mean(axis=1).sum()

    contiguous = tile_counts("contiguous", seq, n, chunk)
    assert max_over_mean(contiguous) > 1.5  # the early devices idle in most steps
    for name in ("striped", "zigzag"):
        counts = tile_counts(name, seq, n, chunk)
        assert max_over_mean(counts) <= 1.05, name
        assert counts.sum() <= contiguous.sum() * 1.15


def test_model_loss_and_gradients_do_not_depend_on_the_layout():
    """The data path permutes tokens, targets, positions and segments once; the model's loss
    and gradients must come out the same for every layout."""
    import jax
    import jax.numpy as jnp

    from ringformer import model

    cfg0 = model.ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                             ffn_dim=64, dtype="float32", mlp_chunk=8, loss_chunk=8, remat="full",
                             attention=model.AttentionConfig(impl="ring", q_chunk=4, kv_chunk=4))
    params = model.init_params(cfg0, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b, s, n = 2, 64, 4
    tok = rng.integers(0, 64, (b, s + 1))
    seg = np.sort(rng.integers(1, 4, (b, s)), axis=1)
    pos = np.zeros((b, s), int)
    for r in range(b):  # positions restart at each document
        for i in range(1, s):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    natural = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg,
               "positions": pos, "loss_mask": np.ones((b, s), np.float32)}
    mesh = mesh_of(sp=n, dp=2)
    results = {}
    for name in layout.LAYOUTS:
        cfg = cfg0.with_attention(layout=name)
        batch = {k: jnp.asarray(layout.permute(v, name, n, axis=1)) for k, v in natural.items()}
        fn = jax.jit(jax.value_and_grad(
            lambda p, bt, cfg=cfg: model.loss_fn(cfg, p, bt, mesh=mesh)[0]))
        results[name] = fn(params, batch)
    ref_loss, ref_grads = results["contiguous"]
    for name in ("striped", "zigzag"):
        loss, grads = results[name]
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("name,n,effective,pieces,cap", [
    ("zigzag", 1, "contiguous", 1, 12),  # one device: natural order whatever the config says
    ("zigzag", 4, "zigzag", 8, 6),  # two pieces a device; chunks within one piece
    ("striped", 4, "striped", 4, 12),
    ("contiguous", 4, "contiguous", 4, 12),
])
def test_layout_rules(name, n, effective, pieces, cap):
    assert layout.effective(name, n) == effective
    assert layout.pieces(name, n) == pieces
    assert layout.chunk_cap(name, 12, n) == cap
    layout.check(name, 8 * n, n)
    if pieces > 1:
        with pytest.raises(ValueError, match=f"divisible by {pieces}"):
            layout.check(name, pieces + 1, n)


def test_config_is_importable_without_jax():
    """Scripts size the CPU devices from the config before jax starts; the layout rules the
    config checks with must not start it either."""
    import subprocess
    import sys

    code = "import sys, ringformer.config; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
