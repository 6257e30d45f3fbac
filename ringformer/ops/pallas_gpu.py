"""One block of ring attention as fused Pallas (Triton) kernels, for GPUs.

The XLA kernel (`xla_tiles.py`) materialises every score tile in device memory; on a GPU that
makes attention memory-bound (docs/BENCHMARKS.md, gpu). These kernels keep a tile in registers
and shared memory. They compute one query block against one key/value block, as a ring step
does, with the ring's masking rule: a query sees a key when its natural token index is not
smaller (causal) and both carry the same segment id. So they are exact for any layout.

- `block_forward` returns the block's normalised output and log-sum-exp; the ring merges
  blocks with `merge`.
- `block_backward` takes the *global* log-sum-exp and delta = rowsum(o * do) of the whole
  ring forward. It returns this block's contributions to dq, dk and dv.

Shapes: q, do [b, Lq, h, d]; k, v [b, Lk, kv, d] (kv divides h); q_index [Lq], kv_index [Lk];
q_seg [b, Lq], kv_seg [b, Lk]; lse, delta [b, h, Lq]. Blocks must divide the lengths.
`interpret=True` runs the same kernels on any backend (the CPU tests do).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringformer.ops.xla_tiles import F32, MASK


def _params(interpret: bool, num_warps: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _visible(qi, ki, qs, ks, causal: bool):
    mask = qs[:, None] == ks[None, :]
    if causal:
        mask = jnp.logical_and(mask, qi[:, None] >= ki[None, :])
    return mask


def _any_visible(qi, ki, qs, ks, causal: bool):
    """False when no entry of the tile can be visible, so it is skipped: wholly above the
    diagonal, or query and key segment ranges that do not overlap (no shared document)."""
    share = jnp.logical_and(jnp.max(qs) >= jnp.min(ks), jnp.min(qs) <= jnp.max(ks))
    return jnp.logical_and(share, jnp.max(qi) >= jnp.min(ki)) if causal else share


def _fwd_kernel(q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, o_ref, lse_ref, *,
                scale: float, causal: bool, block_k: int):
    q = q_ref[...]
    qi, qs = qi_ref[...], qs_ref[...]
    bq, d = q.shape

    def body(j, carry):
        sl = pl.ds(j * block_k, block_k)
        ki, ks = ki_ref[sl], ks_ref[sl]

        def compute(carry):
            o, m, l = carry
            k, v = k_ref[sl, :], v_ref[sl, :]
            s = jnp.dot(q, k.T, preferred_element_type=F32) * scale
            mask = _visible(qi, ki, qs, ks, causal)
            s = jnp.where(mask, s, MASK)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            corr = jnp.exp(m - m_new)
            o = o * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
            return o, m_new, l * corr + jnp.sum(p, axis=1)

        return lax.cond(_any_visible(qi, ki, qs, ks, causal), compute, lambda c: c, carry)

    init = (jnp.zeros((bq, d), F32), jnp.full((bq,), MASK, F32), jnp.zeros((bq,), F32))
    o, m, l = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l), MASK)


def _query_grid_specs(block_q: int, lk: int, d: int, g: int):
    """Block specs of a kernel gridded over (query tile i, batch, query head): its query tile,
    the whole key/value block of the head's group, its rows of [b, h, Lq] statistics, and the
    index and segment blocks of both sides."""
    q_tile = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_all = pl.BlockSpec((None, lk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    row = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
    masks = [pl.BlockSpec((block_q,), lambda i, bi, hi: (i,)),
             pl.BlockSpec((lk,), lambda i, bi, hi: (0,)),
             pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
             pl.BlockSpec((None, lk), lambda i, bi, hi: (bi, 0))]
    return q_tile, kv_all, row, masks


def block_forward(q, k, v, q_index, kv_index, q_seg, kv_seg, *, causal: bool, scale: float,
                  block_q: int = 64, block_k: int = 64, interpret: bool = False):
    """(o [b, Lq, h, d] fp32, lse [b, h, Lq] fp32) of q against this key/value block alone.
    Rows that see no key get o = 0 and lse = MASK, so `merge` ignores them."""
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    q_tile, kv_all, row, masks = _query_grid_specs(block_q, lk, d, g)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, block_k=block_k),
        grid=(lq // block_q, b, h),
        in_specs=[q_tile, kv_all, kv_all, *masks],
        out_specs=[q_tile, row],
        out_shape=[jax.ShapeDtypeStruct((b, lq, h, d), F32),
                   jax.ShapeDtypeStruct((b, h, lq), F32)],
        compiler_params=_params(interpret, 4 if d <= 64 else 8),
        interpret=interpret,
        name="ring_block_forward",
    )(q, k, v, q_index, kv_index, q_seg, kv_seg)


def merge(o, lse, o_blk, lse_blk):
    """Fold one block's (o, lse) into the running pair: exact softmax over both key sets."""
    new = jnp.logaddexp(lse, lse_blk)
    w_old = jnp.exp(lse - new).transpose(0, 2, 1)[..., None]  # [b, Lq, h, 1]
    w_blk = jnp.exp(lse_blk - new).transpose(0, 2, 1)[..., None]
    return o * w_old + o_blk * w_blk, new


def _recompute(q, k, v, do, lse, delta, mask, scale: float):
    """A backward tile from the forward's global lse: probabilities p and ds = p (dp - delta),
    ds already carrying the 1/sqrt(d) that dq and dk need."""
    s = jnp.dot(q, k.T, preferred_element_type=F32) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=F32)
    return p, p * (dp - delta[:, None]) * scale


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref,
                dk_ref, dv_ref, *, scale: float, causal: bool, block_q: int, group: int):
    k, v = k_ref[...], v_ref[...]
    ki, ks = ki_ref[...], ks_ref[...]
    bk, d = k.shape
    dk = jnp.zeros((bk, d), F32)
    dv = jnp.zeros((bk, d), F32)
    for hh in range(group):  # the query heads that share this key head
        def body(i, carry, hh=hh):
            sl = pl.ds(i * block_q, block_q)
            qi, qs = qi_ref[sl], qs_ref[sl]

            def compute(carry):
                dk, dv = carry
                q, do = q_ref[sl, hh, :], do_ref[sl, hh, :]
                p, ds = _recompute(q, k, v, do, lse_ref[hh, sl], delta_ref[hh, sl],
                                   _visible(qi, ki, qs, ks, causal), scale)
                dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=F32)
                return dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=F32), dv

            return lax.cond(_any_visible(qi, ki, qs, ks, causal), compute, lambda c: c, carry)

        dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, (dk, dv))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref,
               dq_ref, *, scale: float, causal: bool, block_k: int):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qi, qs = qi_ref[...], qs_ref[...]

    def body(j, dq):
        sl = pl.ds(j * block_k, block_k)
        ki, ks = ki_ref[sl], ks_ref[sl]

        def compute(dq):
            k, v = k_ref[sl, :], v_ref[sl, :]
            _, ds = _recompute(q, k, v, do, lse, delta, _visible(qi, ki, qs, ks, causal), scale)
            return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

        return lax.cond(_any_visible(qi, ki, qs, ks, causal), compute, lambda c: c, dq)

    dq_ref[...] = lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros(q.shape, F32))


def block_backward(q, k, v, q_index, kv_index, q_seg, kv_seg, do, lse, delta, *, causal: bool,
                   scale: float, block_q: int = 64, block_k: int = 64, interpret: bool = False):
    """This key/value block's share of the gradient: (dq [b, Lq, h, d], dk, dv [b, Lk, kv, d]),
    all fp32, given the whole ring forward's lse and delta [b, h, Lq]."""
    b, lq, h, d = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    params = _params(interpret, 4 if d <= 64 else 8)
    args = (q, do, lse, delta, k, v, q_index, kv_index, q_seg, kv_seg)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, group=g),
        grid=(lk // block_k, b, kvh),
        in_specs=[
            pl.BlockSpec((None, lq, g, d), lambda j, bi, ki: (bi, 0, ki, 0)),
            pl.BlockSpec((None, lq, g, d), lambda j, bi, ki: (bi, 0, ki, 0)),
            pl.BlockSpec((None, g, lq), lambda j, bi, ki: (bi, ki, 0)),
            pl.BlockSpec((None, g, lq), lambda j, bi, ki: (bi, ki, 0)),
            pl.BlockSpec((None, block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
            pl.BlockSpec((None, block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
            pl.BlockSpec((lq,), lambda j, bi, ki: (0,)),
            pl.BlockSpec((block_k,), lambda j, bi, ki: (j,)),
            pl.BlockSpec((None, lq), lambda j, bi, ki: (bi, 0)),
            pl.BlockSpec((None, block_k), lambda j, bi, ki: (bi, j)),
        ],
        out_specs=[pl.BlockSpec((None, block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((b, lk, kvh, d), F32)] * 2,
        compiler_params=params, interpret=interpret, name="ring_block_dkv",
    )(*args)
    q_tile, kv_all, row, masks = _query_grid_specs(block_q, lk, d, g)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, block_k=block_k),
        grid=(lq // block_q, b, h),
        in_specs=[q_tile, q_tile, row, row, kv_all, kv_all, *masks],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct((b, lq, h, d), F32),
        compiler_params=params, interpret=interpret, name="ring_block_dq",
    )(*args)
    return dq, dk, dv
