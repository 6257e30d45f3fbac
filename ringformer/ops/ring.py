"""The ring: key/value blocks circulate over `Options.axis_name` while each device sweeps its
query block against the block it holds; forward and backward are joined by one custom VJP
(`ring_core`). With no axis the same code is blockwise attention on one device. The per-block
work is `ringformer.ops.xla_tiles` (any backend) or `ringformer.ops.pallas_gpu` (fused kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ringformer.ops import pallas_gpu as pb
from ringformer.ops.xla_tiles import (
    F32,
    MASK,
    Options,
    bwd_tile,
    fwd_tile,
    merge_kv,
    merge_q,
    split_kv,
    split_q,
    split_seq,
    sweep,
)

# ----------------------------------------------------------------------------- ring core


def _kv_side(k, v, seg, index, chunk: int):
    """The key/value block in chunk layout, built once: the ring sends it on in that layout,
    so a step works on the block it receives as it arrives."""
    return split_kv(k, chunk), split_kv(v, chunk), split_seq(index, chunk), split_seq(seg, chunk)


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
    qc = split_q(_prescale(q, opts), kv, cq)
    q_side = (qc, split_seq(index, cq, g), split_seq(seg, cq, g))
    o = jnp.zeros_like(qc, F32)
    m = jnp.full_like(qc[..., 0], MASK, F32)
    l = jnp.zeros_like(qc[..., 0], F32)

    def step(acc, kv_side):
        acc, _ = sweep(functools.partial(fwd_tile, opts=opts), q_side, kv_side, acc, (), opts)
        return acc

    (o, m, l), kv_side = _ring_loop(step, (o, m, l), _kv_side(k, v, seg, index, ck), opts,
                                    home=home)
    l = jnp.where(l == 0.0, 1.0, l)  # only rows that see nothing (none in causal/self attention)
    out = merge_q(o / l[..., None], cq).astype(q.dtype)
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
    qc, doc = split_q(_prescale(q, opts), kv, cq), split_q(dout, kv, cq)
    # delta_i = sum_j p_ij dp_ij = <o_i, do_i>: the softmax-jacobian term, computed once.
    delta = jnp.sum(split_q(out, kv, cq).astype(F32) * doc.astype(F32), axis=-1)
    q_side = (qc, doc, lse, delta, split_seq(index, cq, g), split_seq(seg, cq, g))
    dq = jnp.zeros_like(qc, F32)
    dkv_t = jnp.zeros_like(jnp.swapaxes(kv_side[0], -1, -2), F32)  # [nk, b, kv, d, ck]
    dkv = (dkv_t, dkv_t)

    def accumulate(kv_side, dq, dkv):
        return sweep(functools.partial(bwd_tile, opts=opts), q_side, kv_side, dq, dkv, opts)

    dq, (dk_t, dv_t) = _ring_gradients(accumulate, dq, dkv, kv_side, opts)
    dk, dv = (merge_kv(jnp.swapaxes(x, -1, -2)) for x in (dk_t, dv_t))
    dtype = kv_side[0].dtype
    return (merge_q(dq, cq) * opts.scale).astype(q.dtype), dk.astype(dtype), dv.astype(dtype)


# ----------------------------------------------------------------------------- fused GPU blocks
# The same ring with one fused kernel per block (`ops/pallas_gpu.py`) instead of XLA tile sweeps:
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
