"""Sequence layouts: permutations, their inverses, and exact causal attention in every layout."""

import numpy as np
import pytest

from ringformer import layout
from ringformer.attention import attention, tile_counts
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
