"""The tile work shared by blockwise and ring attention, forward and backward, with XLA ops.

A *sweep* visits the (query chunk, key chunk) tiles of one local query block against one
key/value block; a *tile function* does the work of a tile: the forward one updates the
online-softmax state (o, m, l), the backward one recomputes the probabilities from the saved
log-sum-exp and produces dq, dk, dv. Both get their scores and mask from `_tile_scores`;
`_tile_kind` lets them skip a tile whose entries are all masked and build no mask at all for a
tile whose entries are all visible. `ringformer.ops.ring` runs one sweep per key/value block as
the blocks rotate over `Options.axis_name`; with no axis it is blockwise attention. The public
entry points, with shapes and checks, are in `ringformer/attention.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A finite "minus infinity": exp(MASK - m) underflows to 0 without inf - inf = nan.
MASK = -1e30
F32 = jnp.float32


class Options(NamedTuple):
    """Static settings of one kernel call (hashable: the custom VJP's non-diff argument)."""

    axis_name: str | None
    causal: bool
    q_chunk: int
    kv_chunk: int
    scale: float
    pipeline_grads: bool = False
    kernel: str = "xla"  # "xla": the tile sweeps below; "pallas": fused GPU kernels per block
    interpret: bool = False  # run the Pallas kernels in the interpreter (CPU)


# ----------------------------------------------------------------------------- shared kernel
# Internal layout: heads-major, and the g = heads/kv_heads query heads that share a key head are
# folded into the rows of the query chunk, so every tile matmul is a plain batched dot over
# (batch, kv_head) with g*cq rows: larger for GQA, and with no size-1 group axis, which made
# XLA's CPU backend copy each 8 MB score tile to fix its layout.
#   q: [nq, b, kv, g*cq, d]   k, v: [nk, b, kv, ck, d]
#   q-side index: [nq, g*cq], segments: [nq, b, g*cq]   kv-side index: [nk, ck], segments [nk, b, ck]


def _tile_scores(q_c, k_c, qi, ki, qs, ks, opts: Options, masked: bool):
    """Scaled fp32 scores [b, kv, g*cq, ck] of one tile and its boolean mask (broadcastable),
    or None when the caller knows every entry is visible."""
    # q arrives pre-scaled by 1/sqrt(d) (once per block, not once per tile).
    s = jnp.einsum("bkrd,bkcd->bkrc", q_c, k_c, preferred_element_type=F32)
    if not masked:
        return s, None
    mask = jnp.ones((1, 1, 1, 1), bool)
    if opts.causal:
        mask = mask & (qi[:, None] >= ki[None, :])
    if qs is not None:
        mask = mask & (qs[:, None, :, None] == ks[:, None, None, :])
    return s, mask


SKIP, FULL, MASKED = 0, 1, 2


def _tile_kind(qi, ki, qs, ks, opts: Options):
    """SKIP when every entry of the tile is masked (exact to leave out), FULL when none is (the
    mask need not be built: most tiles below the diagonal of one document), else MASKED."""
    need, full = jnp.asarray(True), jnp.asarray(True)
    if opts.causal:
        need = need & (jnp.max(qi) >= jnp.min(ki))
        full = full & (jnp.min(qi) >= jnp.max(ki))
    if qs is not None:
        # Segment ranges that do not overlap share no document, in any row of the batch.
        q_lo, q_hi, k_lo, k_hi = jnp.min(qs, -1), jnp.max(qs, -1), jnp.min(ks, -1), jnp.max(ks, -1)
        need = need & jnp.any((q_hi >= k_lo) & (q_lo <= k_hi))
        full = full & jnp.all((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo))
    return jnp.where(need, jnp.where(full, FULL, MASKED), SKIP)


def sweep(tile_fn, q_side, kv_side, q_acc, kv_acc, opts: Options):
    """Visit every (q chunk, kv chunk) tile: skip the fully masked ones, build no mask for the
    fully visible ones.

    q_side / kv_side: tuples whose leading axis is the chunk (index and segments last, in that
    order). q_acc (per q chunk) is threaded through the kv loop; kv_acc (per kv chunk) gathers
    what each tile contributes to the key side. Both are updated in place, chunk by chunk:
    scanning q_acc in and out instead would make every sweep allocate a fresh zero-filled
    output buffer, and XLA allocates those early, side by side.
    `tile_fn(q_in, kv_in, q_acc, masked) -> (q_acc, kv_out)`.
    """

    def per_q_chunk(accs, i_and_q_in):
        kv_acc, q_acc = accs
        i, q_in = i_and_q_in
        acc = jax.tree.map(lambda t: t[i], q_acc)
        qi, qs = q_in[-2], q_in[-1]

        def per_kv_chunk(carry, j_and_kv_in):
            acc, kv_acc = carry
            j, kv_in = j_and_kv_in
            ki, ks = kv_in[-2], kv_in[-1]

            def skip(acc):
                return acc, jax.tree.map(lambda t: jnp.zeros_like(t[0]), kv_acc)

            acc, kv_out = lax.switch(_tile_kind(qi, ki, qs, ks, opts),
                                     [skip, lambda a: tile_fn(q_in, kv_in, a, False),
                                      lambda a: tile_fn(q_in, kv_in, a, True)], acc)
            # Added in place into chunk j's slot: stacking per-tile outputs and summing them
            # after the loop would read and write the whole key side once per query chunk.
            kv_acc = jax.tree.map(lambda t, o: t.at[j].add(o), kv_acc, kv_out)
            return (acc, kv_acc), None

        n_kv = jax.tree.leaves(kv_side)[0].shape[0]
        (acc, kv_acc), _ = lax.scan(per_kv_chunk, (acc, kv_acc), (jnp.arange(n_kv), kv_side))
        return (kv_acc, jax.tree.map(lambda t, a: t.at[i].set(a), q_acc, acc)), None

    n_q = jax.tree.leaves(q_side)[0].shape[0]
    (kv_acc, q_acc), _ = lax.scan(per_q_chunk, (kv_acc, q_acc), (jnp.arange(n_q), q_side))
    return q_acc, kv_acc


def fwd_tile(q_in, kv_in, acc, masked: bool, opts: Options):
    q_c, qi, qs = q_in
    k_c, v_c, ki, ks = kv_in
    o, m, l = acc
    s, mask = _tile_scores(q_c, k_c, qi, ki, qs, ks, opts, masked)
    if masked:
        s = jnp.where(mask, s, MASK)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if masked:  # zeroed explicitly so a row with nothing visible yet adds nothing
        p = jnp.where(mask, p, 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkrc,bkcd->bkrd", p.astype(v_c.dtype), v_c, preferred_element_type=F32)
    o = o * corr[..., None] + pv
    return (o, m_new, l), ()


def bwd_tile(q_in, kv_in, dq, masked: bool, opts: Options):
    q_c, do_c, lse_c, delta_c, qi, qs = q_in
    k_c, v_c, ki, ks = kv_in
    s, mask = _tile_scores(q_c, k_c, qi, ki, qs, ks, opts, masked)
    p = jnp.exp(s - lse_c[..., None])
    if masked:
        p = jnp.where(mask, p, 0.0)
    # dk and dv come out transposed, [d, ck]: contracting the big [cq, ck] tile over its leading
    # axis as the *right* operand is a plain matmul, while as the left operand XLA's CPU backend
    # transposes 8 MB first (measured 1.6x slower). They are accumulated and sent transposed.
    dv_t = jnp.einsum("bkrd,bkrc->bkdc", do_c, p.astype(do_c.dtype), preferred_element_type=F32)
    dp = jnp.einsum("bkrd,bkcd->bkrc", do_c, v_c, preferred_element_type=F32)
    ds = p * (dp - delta_c[..., None])  # dq's 1/sqrt(d) is applied once at the end
    dq = dq + jnp.einsum("bkrc,bkcd->bkrd", ds.astype(k_c.dtype), k_c, preferred_element_type=F32)
    dk_t = jnp.einsum("bkrd,bkrc->bkdc", q_c, ds.astype(q_c.dtype), preferred_element_type=F32)
    return dq, (dk_t, dv_t)


# ----------------------------------------------------------------------------- layout helpers


def split_q(x, kv: int, chunk: int):
    """[b, s, h, ...] -> [s/chunk, b, kv, (h/kv)*chunk, ...]: rows ordered (group head, token)."""
    b, s, h = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, s // chunk, chunk, kv, h // kv, *rest)
    x = jnp.moveaxis(x, (1, 3, 4, 2), (0, 2, 3, 4))
    return x.reshape(s // chunk, b, kv, (h // kv) * chunk, *rest)


def merge_q(x, chunk: int):
    """Inverse of `split_q`."""
    n, b, kv, rows = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(n, b, kv, rows // chunk, chunk, *rest)
    return jnp.moveaxis(x, (0, 2, 3, 4), (1, 3, 4, 2)).reshape(b, n * chunk, -1, *rest)


def split_kv(x, chunk: int):
    """[b, s, kv, d] -> [s/chunk, b, kv, chunk, d]."""
    b, s, kv, d = x.shape
    return jnp.moveaxis(x.reshape(b, s // chunk, chunk, kv, d), (1, 3), (0, 2))


def merge_kv(x):
    n, b, kv, c, d = x.shape
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, n * c, kv, d)


def split_seq(x, chunk: int, groups: int = 1):
    """index [s] -> [s/chunk, groups*chunk]; segments [b, s] -> [s/chunk, b, groups*chunk], the
    chunk repeated once per group head to label `split_q`'s rows; None stays None."""
    if x is None:
        return None
    x = x.reshape(-1, chunk) if x.ndim == 1 else jnp.moveaxis(x.reshape(x.shape[0], -1, chunk), 1, 0)
    return jnp.tile(x, (1,) * (x.ndim - 1) + (groups,))
