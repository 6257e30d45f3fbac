"""Exact attention three ways: dense (reference), blockwise (one device), ring (over mesh axis sp).

Shapes everywhere: q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim] with
kv_heads dividing heads (GQA: k/v are never repeated, so ring traffic shrinks by heads/kv_heads).

The blockwise and ring paths share one kernel. A *sweep* visits the (query chunk, key chunk)
tiles of one local query block against one key/value block; a *tile function* does the work of a
tile: the forward one updates the online-softmax state (o, m, l), the backward one recomputes the
probabilities from the saved log-sum-exp and produces dq, dk, dv. Both get their scores and mask
from `_tile_scores`; `_tile_kind` lets them skip a tile whose entries are all masked and
build no mask at all for a tile whose entries are all visible.

Masks are driven by each token's natural position (`token_index`), not by its slot, so the same
kernel is exact for any sequence layout (contiguous, striped, zigzag): the index block travels
around the ring with its keys and values. Ring attention is therefore blockwise attention run
n_sp times, once per key/value block as the blocks rotate; with n_sp = 1 it *is* blockwise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ringformer import layout as layouts

IMPLS = ("ring", "blockwise", "dense")
# Tuned on the CPU backend (docs/BENCHMARKS.md): taller query chunks amortise each key chunk's
# slicing and the per-tile loop overhead over more rows; 1024 x 512 beat 512 x 512 by ~10%.
DEFAULT_Q_CHUNK, DEFAULT_KV_CHUNK = 1024, 512
# A finite "minus infinity": exp(MASK - m) underflows to 0 without inf - inf = nan.
MASK = -1e30
F32 = jnp.float32


class _Options(NamedTuple):
    axis_name: str | None
    causal: bool
    q_chunk: int
    kv_chunk: int
    scale: float


# ----------------------------------------------------------------------------- reference


def dense_attention(q, k, v, *, causal: bool = True, segment_ids=None, token_index=None,
                    scale: float | None = None):
    """Plain softmax attention on one device; materialises [seq, seq] scores. The reference.

    q: [b, s, h, d]; k, v: [b, s, kv, d]; segment_ids: [b, s] ints or None;
    token_index: [s] natural positions of the tokens (default arange) for the causal mask.
    Returns [b, s, h, d] in q's dtype; softmax in fp32.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = jnp.arange(s, dtype=jnp.int32) if token_index is None else token_index
    qg = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bqkgd,bckd->bkgqc", qg, k, preferred_element_type=F32) * scale
    mask = jnp.ones((1, 1, 1, s, s), bool)
    if causal:
        mask = mask & (idx[:, None] >= idx[None, :])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
    scores = jnp.where(mask, scores, MASK)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqc,bckd->bqkgd", p.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(b, s, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- shared kernel
# Internal layout: heads-major, and the g = heads/kv_heads query heads that share a key head are
# folded into the rows of the query chunk, so every tile matmul is a plain batched dot over
# (batch, kv_head) with g*cq rows: larger for GQA, and with no size-1 group axis, which made
# XLA's CPU backend copy each 8 MB score tile to fix its layout.
#   q: [nq, b, kv, g*cq, d]   k, v: [nk, b, kv, ck, d]
#   q-side index: [nq, g*cq], segments: [nq, b, g*cq]   kv-side index: [nk, ck], segments [nk, b, ck]


def _tile_scores(q_c, k_c, qi, ki, qs, ks, opts: _Options, masked: bool):
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


def _tile_kind(qi, ki, qs, ks, opts: _Options):
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


def _sweep(tile_fn, q_side, kv_side, q_acc, kv_acc, opts: _Options):
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


def _fwd_tile(q_in, kv_in, acc, masked: bool, opts: _Options):
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


def _bwd_tile(q_in, kv_in, dq, masked: bool, opts: _Options):
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


def _ring_size(opts: _Options) -> int:
    return 1 if opts.axis_name is None else lax.axis_size(opts.axis_name)


def _rotate(tree, opts: _Options):
    """Send every array to the next device on the ring (device i -> i + 1)."""
    n = _ring_size(opts)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, opts.axis_name, perm), tree)


def _ring_loop(step, carry, kv, opts: _Options, *, home: bool = False):
    """Run `step(carry, kv) -> carry` on each of the n key/value blocks as they circulate.

    Each step's send of the block is issued before the step's compute, so XLA can run the
    collective-permute asynchronously under the compute (the overlap the paper relies on).

    With `home`, the last block is sent on too, so this device's own block comes back: returns
    (carry, own block). It costs one more send and saves a block of memory in training:
    - the forward keeps the returned copy for the backward instead of its original, which then
      dies after the first send: two blocks live at once, not three;
    - in the backward every send stays inside the loop. With n - 1 steps a ring of two has a
      one-step loop, which XLA inlines; its send is then issued as soon as the block exists,
      early in the layer's recomputed forward, and holds a second block through the rest of it.
    Without `home`, the last send is skipped and only the carry is returned.
    """
    n = _ring_size(opts)
    if n == 1:
        carry = step(carry, kv)
        return (carry, kv) if home else carry

    def body(c, _):
        carry, kv = c
        kv_next = _rotate(kv, opts)
        return (step(carry, kv), kv_next), None

    (carry, kv), _ = lax.scan(body, (carry, kv), None, length=n if home else n - 1)
    return (carry, kv) if home else step(carry, kv)


def _prescale(q, opts: _Options):
    """q * 1/sqrt(d): scores need no per-tile scaling, and dk = ds^T (q * scale) directly."""
    return (q.astype(F32) * opts.scale).astype(q.dtype)


def _forward(q, k, v, seg, index, opts: _Options, *, home: bool = False):
    """Returns (out, lse), plus this device's key/value block brought home if `home`."""
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

    res = _ring_loop(step, (o, m, l), _kv_side(k, v, seg, index, ck), opts, home=home)
    (o, m, l), kv_side = res if home else (res, None)
    l = jnp.where(l == 0.0, 1.0, l)  # only rows that see nothing (none in causal/self attention)
    out = _merge_q(o / l[..., None], cq).astype(q.dtype)
    lse = m + jnp.log(l)  # [nq, b, kv, g*cq]
    return (out, lse, kv_side) if home else (out, lse)


def _backward(q, kv_side, seg, index, out, lse, dout, opts: _Options):
    """kv_side: this device's key/value block in chunk layout, as `_forward` brought it home."""
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

    def step(carry, kv_side):
        dq, dkv = carry
        dq, dkv = _sweep(functools.partial(_bwd_tile, opts=opts), q_side, kv_side, dq, dkv, opts)
        # dk/dv follow their block around the ring; after n hops they are back home.
        if _ring_size(opts) > 1:
            dkv = _rotate(dkv, opts)
        return dq, dkv

    # The block goes all the way home here too, though nothing uses it there: see _ring_loop.
    (dq, (dk_t, dv_t)), _ = _ring_loop(step, (dq, dkv), kv_side, opts, home=True)
    dk, dv = (_merge_kv(jnp.swapaxes(x, -1, -2)) for x in (dk_t, dv_t))
    dtype = kv_side[0].dtype
    return (_merge_q(dq, cq) * opts.scale).astype(q.dtype), dk.astype(dtype), dv.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_core(q, k, v, seg, index, opts: _Options):
    return _forward(q, k, v, seg, index, opts)[0]


def _ring_core_fwd(q, k, v, seg, index, opts: _Options):
    out, lse, kv_side = _forward(q, k, v, seg, index, opts, home=True)
    # Only O(seq) residuals: the probabilities are recomputed tile by tile in the backward.
    return out, (q, kv_side, seg, index, out, lse)


def _ring_core_bwd(opts: _Options, res, dout):
    q, kv_side, seg, index, out, lse = res
    dq, dk, dv = _backward(q, kv_side, seg, index, out, lse, dout, opts)
    return dq, dk, dv, None, None


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def chunk_sizes(local: int, *, q_chunk: int | None = None, kv_chunk: int | None = None,
                zigzag_halves: bool = False) -> tuple[int, int]:
    """The (q_chunk, kv_chunk) the kernel runs with on a local block of `local` tokens: the
    requested sizes or the defaults, capped at the block, or at its halves for a zigzag ring
    (a tile straddling the two halves spans the whole sequence and could never be skipped)."""
    cap = local // 2 if zigzag_halves else local
    return (min(DEFAULT_Q_CHUNK if q_chunk is None else q_chunk, cap),
            min(DEFAULT_KV_CHUNK if kv_chunk is None else kv_chunk, cap))


def _check_chunk(c: int, requested: int | None, length: int, name: str) -> int:
    if c <= 0 or length % c:
        divisors = [d for d in (64, 128, 256, 512, 1024, 2048) if length % d == 0] or [length]
        raise ValueError(f"{name}={requested} does not divide the local block of {length} tokens;"
                         f" use a divisor such as {divisors}")
    return c


def ring_attention(q, k, v, *, axis_name: str | None = "sp", causal: bool = True,
                   segment_ids=None, token_index=None, q_chunk: int | None = None,
                   kv_chunk: int | None = None, scale: float | None = None):
    """Exact ring attention on one shard; call inside `shard_map` over `axis_name`.

    q: [b, L, h, d] this device's query block; k, v: [b, L, kv, d] its key/value block;
    segment_ids: [b, L] ints (packed documents never attend across ids) or None;
    token_index: [L] natural positions of the local tokens (default: contiguous blocks, device
    i holding [i*L, (i+1)*L)); it travels with k/v so the causal mask is exact for any layout.
    Chunks tile the local block (default min(L, 1024) query x min(L, 512) key tokens).
    Returns [b, L, h, d] in q's dtype;
    scores, softmax statistics and accumulators are fp32. Differentiable (custom VJP).
    With axis_name=None this is single-device blockwise attention.
    """
    b, length, h, d = q.shape
    if k.shape[:2] != (b, length) or v.shape != k.shape or k.shape[3] != d:
        raise ValueError(f"k/v shape {k.shape}/{v.shape} does not match q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"heads={h} is not divisible by kv_heads={k.shape[2]}")
    cq, ck = chunk_sizes(length, q_chunk=q_chunk, kv_chunk=kv_chunk)
    opts = _Options(axis_name, causal, _check_chunk(cq, q_chunk, length, "q_chunk"),
                    _check_chunk(ck, kv_chunk, length, "kv_chunk"),
                    1.0 / math.sqrt(d) if scale is None else float(scale))
    if token_index is None:
        rank = 0 if axis_name is None else lax.axis_index(axis_name)
        token_index = rank * length + jnp.arange(length, dtype=jnp.int32)
    return _ring_core(q, k, v, segment_ids, token_index.astype(jnp.int32), opts)


def blockwise_attention(q, k, v, *, causal: bool = True, segment_ids=None, token_index=None,
                        q_chunk: int | None = None, kv_chunk: int | None = None,
                        scale: float | None = None):
    """Memory-efficient attention on one device: chunked online softmax, no [s, s] matrix in
    the forward or the backward. Shapes as `ring_attention`."""
    return ring_attention(q, k, v, axis_name=None, causal=causal, segment_ids=segment_ids,
                          token_index=token_index, q_chunk=q_chunk, kv_chunk=kv_chunk, scale=scale)


# ----------------------------------------------------------------------------- global wrapper


def _check_global(q, k, v, mesh: Mesh | None, impl: str, segment_ids) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, kv, d]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    (b, s, h, d), kvh = q.shape, k.shape[2]
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, seq or head_dim")
    if h % kvh:
        raise ValueError(f"heads={h} is not divisible by kv_heads={kvh}; use kv_heads dividing {h}")
    if segment_ids is not None and segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids shape {segment_ids.shape} is not [batch, seq] = {(b, s)}")
    if mesh is None:
        return
    shards = mesh.shape["dp"] * mesh.shape["fsdp"]
    sp, tp = mesh.shape["sp"], mesh.shape["tp"]
    if b % shards:
        raise ValueError(f"batch={b} is not divisible by dp*fsdp={shards}")
    if kvh % tp:
        raise ValueError(f"kv_heads={kvh} (heads={h}) is not divisible by tp={tp}")
    if impl == "ring" and s % sp:
        raise ValueError(f"seq={s} is not divisible by sp={sp}; use a multiple of {sp}")


@functools.partial(jax.jit, static_argnames=("mesh", "impl", "causal", "q_chunk", "kv_chunk",
                                             "layout"))
def attention_in_layout(q, k, v, *, mesh: Mesh | None, impl: str = "ring", causal: bool = True,
                        segment_ids=None, q_chunk: int | None = None,
                        kv_chunk: int | None = None, layout: str = "contiguous"):
    """Attention over global arrays already permuted into `layout` along the sequence.

    This is what the model calls: the data path permutes tokens once, so no layer pays for it.
    Shards batch over (dp, fsdp), heads over tp, and, for impl="ring", the sequence over sp.
    mesh=None runs on the default device without shard_map. Returns [b, s, h, d] in layout order.
    """
    _check_global(q, k, v, mesh, impl, segment_ids)
    n_sp = 1 if mesh is None else mesh.shape["sp"]
    s = q.shape[1]
    index = jnp.asarray(layouts.permutation(layout, s, n_sp), jnp.int32)

    if impl == "ring" and layout == "zigzag" and n_sp > 1:
        q_chunk, kv_chunk = chunk_sizes(s // n_sp, q_chunk=q_chunk, kv_chunk=kv_chunk,
                                        zigzag_halves=True)

    def local(q, k, v, seg, idx):
        if impl == "dense":
            return dense_attention(q, k, v, causal=causal, segment_ids=seg, token_index=idx)
        ring = impl == "ring" and mesh is not None  # no mesh: the ring of one is blockwise
        return ring_attention(q, k, v, axis_name="sp" if ring else None, causal=causal,
                              segment_ids=seg, token_index=idx, q_chunk=q_chunk,
                              kv_chunk=kv_chunk)

    if mesh is None:
        return local(q, k, v, segment_ids, index)
    seq = "sp" if impl == "ring" else None
    spec, seg_spec = P(("dp", "fsdp"), seq, "tp", None), P(("dp", "fsdp"), seq)
    q, k, v = (jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, P(seq)),
                       out_specs=spec)
    return fn(q, k, v, segment_ids, index)


def attention(q, k, v, *, mesh: Mesh | None, impl: str = "ring", causal: bool = True,
              segment_ids=None, q_chunk: int | None = None, kv_chunk: int | None = None,
              layout: str = "contiguous"):
    """Exact attention over global arrays in natural token order; differentiable.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids:
    [batch, seq] or None. impl: "ring" (sequence split over sp, k/v blocks rotate), "blockwise"
    or "dense" (whole sequence per device). `layout` balances causal work across the ring; it
    is applied and undone here, so results are in natural order whatever it is.
    Raises ValueError, with the numbers, for shapes the mesh cannot split.
    """
    n_sp = 1 if mesh is None else mesh.shape["sp"]
    if layout != "contiguous" and n_sp > 1:
        q, k, v = (layouts.permute(x, layout, n_sp, axis=1) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = layouts.permute(segment_ids, layout, n_sp, axis=1)
    out = attention_in_layout(q, k, v, mesh=mesh, impl=impl, causal=causal,
                              segment_ids=segment_ids, q_chunk=q_chunk, kv_chunk=kv_chunk,
                              layout=layout if n_sp > 1 else "contiguous")
    if layout != "contiguous" and n_sp > 1:
        out = layouts.unpermute(out, layout, n_sp, axis=1)
    return out


def tile_counts(layout: str, seq_len: int, n_sp: int, chunk: int) -> np.ndarray:
    """Causal tiles each device computes at each ring step: int array [n_sp steps, n_sp devices].

    Uses the kernel's own skipping rule on the layout's token indices, so the balance benchmark
    measures what the ring really does.
    """
    idx = layouts.permutation(layout, seq_len, n_sp).reshape(n_sp, -1, chunk)  # [dev, chunks, c]
    counts = np.zeros((n_sp, n_sp), dtype=np.int64)
    for step in range(n_sp):
        for dev in range(n_sp):
            q, kv = idx[dev], idx[(dev - step) % n_sp]
            counts[step, dev] = int((q.max(1)[:, None] >= kv.min(1)[None, :]).sum())
    return counts
