"""The fused block kernels against float64 numpy, one block at a time, in Pallas's interpreter.

Tokens sit in a shuffled layout, so masking must follow the token-index and segment arrays
rather than the slot order; two key/value blocks are merged as two ring steps would be.
"""

import numpy as np
import pytest

from ringformer.ops import pallas_gpu as pb

B, L, H, KV, D = 2, 32, 4, 2, 16


def _reference(q, k, v, do, index, seg, scale):
    """float64 attention over the whole key set with the index/segment mask, and its gradients."""
    g = H // KV
    qq, dd = q.astype(np.float64), do.astype(np.float64)
    kk, vv = (np.repeat(x.astype(np.float64), g, 2) for x in (k, v))
    mask = (index[:, None] >= index[None, :])[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, np.einsum("bqhd,bkhd->bhqk", qq, kk) * scale, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask, np.exp(s - m), 0.0)
    l = p.sum(-1, keepdims=True)
    p = p / l
    o = np.einsum("bhqk,bkhd->bqhd", p, vv)
    delta = np.einsum("bqhd,bqhd->bhq", o, dd)
    ds = p * (np.einsum("bqhd,bkhd->bhqk", dd, vv) - delta[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
    dk = (np.einsum("bhqk,bqhd->bkhd", ds, qq) * scale).reshape(B, L, KV, g, D).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dd).reshape(B, L, KV, g, D).sum(3)
    return o, (m + np.log(l))[..., 0], delta, dq, dk, dv


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    q, do = (rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, L, KV, D)).astype(np.float32) for _ in range(2))
    index = rng.permutation(L).astype(np.int32)  # slot i holds token index[i]
    seg = np.sort(rng.integers(1, 4, (B, L)), axis=1).astype(np.int32)[:, index]
    return q, k, v, do, index, seg, D ** -0.5


KW = dict(causal=True, block_q=8, block_k=8, interpret=True)
HALVES = (slice(0, L // 2), slice(L // 2, L))


def test_forward_blocks_merge_to_the_reference(case):
    q, k, v, do, index, seg, scale = case
    want_o, want_lse, *_ = _reference(q, k, v, do, index, seg, scale)
    o, lse = np.zeros((B, L, H, D), np.float32), np.full((B, H, L), pb.MASK, np.float32)
    for sl in HALVES:
        o, lse = pb.merge(o, lse, *pb.block_forward(q, k[:, sl], v[:, sl], index, index[sl], seg,
                                                    seg[:, sl], scale=scale, **KW))
    np.testing.assert_allclose(o, want_o, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-6)


def test_backward_blocks_sum_to_the_reference_gradients(case):
    q, k, v, do, index, seg, scale = case
    _, lse, delta, want_dq, want_dk, want_dv = _reference(q, k, v, do, index, seg, scale)
    dq, dks, dvs = 0.0, [], []
    for sl in HALVES:
        a, dk, dv = pb.block_backward(q, k[:, sl], v[:, sl], index, index[sl], seg, seg[:, sl], do,
                                      lse.astype(np.float32), delta.astype(np.float32),
                                      scale=scale, **KW)
        dq, dks, dvs = dq + np.asarray(a), [*dks, dk], [*dvs, dv]
    for got, want in ((dq, want_dq), (np.concatenate(dks, 1), want_dk), (np.concatenate(dvs, 1), want_dv)):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_block_nobody_may_see_is_ignored_by_merge(case):
    """A key block entirely in every query's future gives lse = MASK and changes nothing."""
    q, k, v, _, _, seg, scale = case
    early, late = np.arange(L, dtype=np.int32), np.arange(L, 2 * L, dtype=np.int32)
    o, lse = pb.block_forward(q, k, v, early, early, seg, seg, scale=scale, **KW)
    o2, lse2 = pb.block_forward(q, k, v, early, late, seg, seg, scale=scale, **KW)
    assert np.all(np.asarray(lse2) == pb.MASK) and np.all(np.asarray(o2) == 0.0)
    merged, merged_lse = pb.merge(o, lse, o2, lse2)
    np.testing.assert_allclose(merged, o, atol=1e-6)
    np.testing.assert_allclose(merged_lse, lse, atol=1e-6)
