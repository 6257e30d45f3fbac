"""The kernel shared by blockwise and ring attention: tiles, sweeps, the ring loop, and the
forward and backward passes joined by one custom VJP (`ring_core`).

A *sweep* visits the (query chunk, key chunk) tiles of one local query block against one
key/value block; a *tile function* does the work of a tile: the forward one updates the
online-softmax state (o, m, l), the backward one recomputes the probabilities from the saved
log-sum-exp and produces dq, dk, dv. Both get their scores and mask from `_tile_scores`;
`_tile_kind` lets them skip a tile whose entries are all masked and build no mask at all for a
tile whose entries are all visible. The ring runs one sweep per key/value block as the blocks
rotate over `Options.axis_name`; with no axis it is blockwise attention. The public entry
points, with shapes and checks, are in `ringformer/attention.py`.
"""

from __future__ import annotations

import functools
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


def _sweep(tile_fn, q_side, kv_side, q_acc, kv_acc, opts: Options):
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


def _fwd_tile(q_in, kv_in, acc, masked: bool, opts: Options):
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


def _bwd_tile(q_in, kv_in, dq, masked: bool, opts: Options):
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


def _split_q(x, kv: int, chunk: int):
    """[b, s, h, ...] -> [s/chunk, b, kv, (h/kv)*chunk, ...]: rows ordered (group head, token)."""
    b, s, h = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, s // chunk, chunk, kv, h // kv, *rest)
    x = jnp.moveaxis(x, (1, 3, 4, 2), (0, 2, 3, 4))
    return x.reshape(s // chunk, b, kv, (h // kv) * chunk, *rest)


def _merge_q(x, chunk: int):
    """Inverse of `_split_q`."""
    n, b, kv, rows = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(n, b, kv, rows // chunk, chunk, *rest)
    return jnp.moveaxis(x, (0, 2, 3, 4), (1, 3, 4, 2)).reshape(b, n * chunk, -1, *rest)


def _split_kv(x, chunk: int):
    """[b, s, kv, d] -> [s/chunk, b, kv, chunk, d]."""
    b, s, kv, d = x.shape
    return jnp.moveaxis(x.reshape(b, s // chunk, chunk, kv, d), (1, 3), (0, 2))


def _merge_kv(x):
    n, b, kv, c, d = x.shape
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, n * c, kv, d)


def _split_seq(x, chunk: int, groups: int = 1):
    """index [s] -> [s/chunk, groups*chunk]; segments [b, s] -> [s/chunk, b, groups*chunk], the
    chunk repeated once per group head to label `_split_q`'s rows; None stays None."""
    if x is None:
        return None
    x = x.reshape(-1, chunk) if x.ndim == 1 else jnp.moveaxis(x.reshape(x.shape[0], -1, chunk), 1, 0)
    return jnp.tile(x, (1,) * (x.ndim - 1) + (groups,))


# ----------------------------------------------------------------------------- ring core


def _kv_side(k, v, seg, index, chunk: int):
    """The key/value block in chunk layout, built once: the ring sends it on in that layout,
    so a step works on the block it receives as it arrives."""
    return _split_kv(k, chunk), _split_kv(v, chunk), _split_seq(index, chunk), _split_seq(seg, chunk)


def _ring_size(opts: Options) -> int:
    return 1 if opts.axis_name is None else lax.axis_size(opts.axis_name)


def _rotate(tree, opts: Options):
    """Send every array to the next device on the ring (device i -> i + 1)."""
    n = _ring_size(opts)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, opts.axis_name, perm), tree)


def _ring_loop(step, carry, kv, opts: Options, *, home: bool = False, follow=None):
    """Run `step(carry, kv) -> carry` on each of the n key/value blocks as they circulate.

    Each step's send of the block is issued before the step's compute, so XLA can run the
    collective-permute asynchronously under the compute (the overlap the paper relies on).

    Returns (carry, own block), the block None unless `home`. With `home`, the last block is
    sent on too, so this device's own block comes back. It costs one more send and saves a
    block of memory in training:
    - the forward keeps the returned copy for the backward instead of its original, which then
      dies after the first send: two blocks live at once, not three;
    - in the backward every send stays inside the loop. With n - 1 steps a ring of two has a
      one-step loop, which XLA inlines; its send is then issued as soon as the block exists,
      early in the layer's recomputed forward, and holds a second block through the rest of it.
    Without `home`, the last send is skipped.

    `follow(carry) -> carry`, if given, sends on what must travel with the block once the
    step has produced it (the backward's dk/dv). XLA combines collective-permutes over the same
    ring into one, and combined with the block's send, which could run under the compute, this
    one, which must wait for the compute, would hold it back: nothing would overlap either (seen
    in the HLO compiled for H100s, `bench.py hlo --target`). A barrier on the block's arrival
    keeps the two sends apart.
    """
    n = _ring_size(opts)
    if n == 1:
        return step(carry, kv), kv if home else None

    def body(c, _):
        carry, kv = c
        kv_next = _rotate(kv, opts)
        carry = step(carry, kv)
        if follow is not None:
            carry, kv_next = lax.optimization_barrier((carry, kv_next))
            carry = follow(carry)
        return (carry, kv_next), None

    (carry, kv), _ = lax.scan(body, (carry, kv), None, length=n if home else n - 1)
    return (carry, kv) if home else (step(carry, kv), None)


def _prescale(q, opts: Options):
    """q * 1/sqrt(d): scores need no per-tile scaling, and dk = ds^T (q * scale) directly."""
    return (q.astype(F32) * opts.scale).astype(q.dtype)


def _forward(q, k, v, seg, index, opts: Options, *, home: bool = False):
    """Returns (out, lse), plus this device's key/value block brought home if `home`."""
    if opts.kernel == "pallas":
        return _pallas_forward(q, k, v, seg, index, opts, home=home)
    # The masks depend only on index and segments, which are the same in every layer. Without
    # a barrier, differentiating a scan over layers hoists that mask work out of the loops and
    # stores it for every tile: an O(seq^2) buffer. The barrier keeps it inside the tile.
    q, seg, index = lax.optimization_barrier((q, seg, index))
    kv = k.shape[2]
    g = q.shape[2] // kv
    cq, ck = opts.q_chunk, opts.kv_chunk
    qc = _split_q(_prescale(q, opts), kv, cq)
    q_side = (qc, _split_seq(index, cq, g), _split_seq(seg, cq, g))
    o = jnp.zeros_like(qc, F32)
    m = jnp.full_like(qc[..., 0], MASK, F32)
    l = jnp.zeros_like(qc[..., 0], F32)

    def step(acc, kv_side):
        acc, _ = _sweep(functools.partial(_fwd_tile, opts=opts), q_side, kv_side, acc, (), opts)
        return acc

    (o, m, l), kv_side = _ring_loop(step, (o, m, l), _kv_side(k, v, seg, index, ck), opts,
                                    home=home)
    l = jnp.where(l == 0.0, 1.0, l)  # only rows that see nothing (none in causal/self attention)
    out = _merge_q(o / l[..., None], cq).astype(q.dtype)
    lse = m + jnp.log(l)  # [nq, b, kv, g*cq]
    return (out, lse, kv_side) if home else (out, lse)


def _ring_gradients(accumulate, dq, zeros, kv_side, opts: Options):
    """Run `accumulate(kv_side, dq, dkv) -> (dq, dkv)` on every block of the ring; returns dq and
    the complete dk/dv of this device's own block, which followed it around the ring."""
    n = _ring_size(opts)
    if n > 1 and opts.pipeline_grads:
        def pipelined(c, _):
            # `pending` is the gradient of the block held one step ago, complete up to this
            # device. It goes on with this step's block, both sends issued before the compute,
            # and what arrives is the running gradient of the block held now. This step's
            # contribution is added after the compute, so the sends overlap it.
            dq, kv, pending = c
            kv_next, incoming = _rotate((kv, pending), opts)
            dq, mine = accumulate(kv, dq, zeros)
            return (dq, kv_next, jax.tree.map(jnp.add, incoming, mine)), None

        (dq, _, pending), _ = lax.scan(pipelined, (dq, kv_side, zeros), None, length=n)
        return dq, _rotate(pending, opts)  # the last block held: its gradient goes home

    def step(carry, kv_side):
        dq, dkv = carry
        return accumulate(kv_side, dq, dkv)

    def follow(carry):  # dk/dv follow their block around the ring; after n hops they are home
        dq, dkv = carry
        return dq, _rotate(dkv, opts)

    # The block goes all the way home here too, though nothing uses it there: see _ring_loop.
    (dq, dkv), _ = _ring_loop(step, (dq, zeros), kv_side, opts, home=True, follow=follow)
    return dq, dkv


def _backward(q, kv_side, seg, index, out, lse, dout, opts: Options):
    """kv_side: this device's key/value block in chunk layout, as `_forward` brought it home."""
    if opts.kernel == "pallas":
        return _pallas_backward(q, kv_side, seg, index, out, lse, dout, opts)
    dout, seg, index = lax.optimization_barrier((dout, seg, index))  # see _forward
    kv = kv_side[0].shape[2]
    g = q.shape[2] // kv
    cq = opts.q_chunk
    qc, doc = _split_q(_prescale(q, opts), kv, cq), _split_q(dout, kv, cq)
    # delta_i = sum_j p_ij dp_ij = <o_i, do_i>: the softmax-jacobian term, computed once.
    delta = jnp.sum(_split_q(out, kv, cq).astype(F32) * doc.astype(F32), axis=-1)
    q_side = (qc, doc, lse, delta, _split_seq(index, cq, g), _split_seq(seg, cq, g))
    dq = jnp.zeros_like(qc, F32)
    dkv_t = jnp.zeros_like(jnp.swapaxes(kv_side[0], -1, -2), F32)  # [nk, b, kv, d, ck]
    dkv = (dkv_t, dkv_t)

    def accumulate(kv_side, dq, dkv):
        return _sweep(functools.partial(_bwd_tile, opts=opts), q_side, kv_side, dq, dkv, opts)

    dq, (dk_t, dv_t) = _ring_gradients(accumulate, dq, dkv, kv_side, opts)
    dk, dv = (_merge_kv(jnp.swapaxes(x, -1, -2)) for x in (dk_t, dv_t))
    dtype = kv_side[0].dtype
    return (_merge_q(dq, cq) * opts.scale).astype(q.dtype), dk.astype(dtype), dv.astype(dtype)


# ----------------------------------------------------------------------------- fused GPU blocks
# The same ring with one fused kernel per block (`pallas_block`) instead of XLA tile sweeps:
# arrays stay in [b, seq, heads, d]; a missing segment array becomes zeros (one document).


def _pallas_kw(opts: Options, lq: int, lk: int) -> dict:
    block_q, block_k = min(128, lq), min(64, lk)
    if lq % block_q or lk % block_k:
        raise ValueError(f"the pallas kernel needs a local block divisible by 128 (queries) and 64 "
                         f"(keys); this one has {lq} queries and {lk} keys")
    return dict(causal=opts.causal, scale=opts.scale, block_q=block_q, block_k=block_k,
                interpret=opts.interpret)


def _with_segments(seg, q):
    return jnp.zeros(q.shape[:2], jnp.int32) if seg is None else seg


def _pallas_forward(q, k, v, seg, index, opts: Options, *, home: bool):
    from ringformer import pallas_block as pb

    seg = _with_segments(seg, q)
    kw = _pallas_kw(opts, q.shape[1], k.shape[1])

    def step(acc, kv_side):
        k, v, ki, ks = kv_side
        return pb.merge(*acc, *pb.block_forward(q, k, v, index, ki, seg, ks, **kw))

    init = (jnp.zeros(q.shape, F32), jnp.full((q.shape[0], q.shape[2], q.shape[1]), MASK, F32))
    (o, lse), kv_side = _ring_loop(step, init, (k, v, index, seg), opts, home=home)
    out = o.astype(q.dtype)
    return (out, lse, kv_side) if home else (out, lse)


def _pallas_backward(q, kv_side, seg, index, out, lse, dout, opts: Options):
    from ringformer import pallas_block as pb

    seg = _with_segments(seg, q)
    k, v = kv_side[:2]
    kw = _pallas_kw(opts, q.shape[1], k.shape[1])
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(F32), dout.astype(F32))

    def accumulate(kv_side, dq, dkv):
        k, v, ki, ks = kv_side
        dq_b, dk_b, dv_b = pb.block_backward(q, k, v, index, ki, seg, ks, dout, lse, delta, **kw)
        return dq + dq_b, (dkv[0] + dk_b, dkv[1] + dv_b)

    zeros = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    dq, (dk, dv) = _ring_gradients(accumulate, jnp.zeros(q.shape, F32), zeros, kv_side, opts)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def ring_core(q, k, v, seg, index, opts: Options):
    return _forward(q, k, v, seg, index, opts)[0]


def _ring_core_fwd(q, k, v, seg, index, opts: Options):
    out, lse, kv_side = _forward(q, k, v, seg, index, opts, home=True)
    # Only O(seq) residuals: the probabilities are recomputed tile by tile in the backward.
    return out, (q, kv_side, seg, index, out, lse)


def _ring_core_bwd(opts: Options, res, dout):
    q, kv_side, seg, index, out, lse = res
    dq, dk, dv = _backward(q, kv_side, seg, index, out, lse, dout, opts)
    return dq, dk, dv, None, None


ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)
