"""Exact attention three ways: dense (reference), blockwise (one device), ring (over mesh axis sp).

Shapes everywhere: q [batch, seq, heads, head_dim], k/v [batch, seq, kv_heads, head_dim] with
kv_heads dividing heads (GQA: k/v are never repeated, so ring traffic shrinks by heads/kv_heads).

The blockwise and ring paths share one kernel (`ringformer/ops/ring.py`): sweeps over the
tiles of a query block against one key/value block, the ring loop that rotates the blocks, and
forward and backward passes that reuse the same tile scoring and skipping.

Masks are driven by each token's natural position (`token_index`), not by its slot, so the same
kernel is exact for any sequence layout (contiguous, striped, zigzag): the index block travels
around the ring with its keys and values. Ring attention is therefore blockwise attention run
n_sp times, once per key/value block as the blocks rotate; with n_sp = 1 it *is* blockwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding

from ringformer import config, sharding
from ringformer.config import IMPLS, KERNELS
from ringformer.ops import layouts
from ringformer.ops.ring import ring_core
from ringformer.ops.xla_tiles import F32, MASK, Options

# Tuned on the CPU backend (docs/BENCHMARKS.md): taller query chunks amortise each key chunk's
# slicing and the per-tile loop overhead over more rows; 1024 x 512 beat 512 x 512 by ~10%.
DEFAULT_Q_CHUNK, DEFAULT_KV_CHUNK = 1024, 512


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



def chunk_sizes(local: int, *, q_chunk: int | None = None, kv_chunk: int | None = None,
                layout: str = "contiguous", n_sp: int = 1) -> tuple[int, int]:
    """The (q_chunk, kv_chunk) the kernel runs with on a local block of `local` tokens of a
    ring of `n_sp` in `layout`: the requested sizes or the defaults, capped at
    `layouts.chunk_cap`."""
    cap = layouts.chunk_cap(layout, local, n_sp)
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
                   kv_chunk: int | None = None, scale: float | None = None,
                   pipeline_grads: bool = False, kernel: str = "xla", interpret: bool = False):
    """Exact ring attention on one shard; call inside `shard_map` over `axis_name`.

    q: [b, L, h, d] this device's query block; k, v: [b, L, kv, d] its key/value block;
    segment_ids: [b, L] ints (packed documents never attend across ids) or None;
    token_index: [L] natural positions of the local tokens (default: contiguous blocks, device
    i holding [i*L, (i+1)*L)); it travels with k/v so the causal mask is exact for any layout.
    Chunks tile the local block (default min(L, 1024) query x min(L, 512) key tokens).
    Returns [b, L, h, d] in q's dtype;
    scores, softmax statistics and accumulators are fp32. Differentiable (custom VJP).
    With axis_name=None this is single-device blockwise attention.
    pipeline_grads: in the backward, send each block's dk/dv on one step late, so that send
    also runs under a step's compute instead of after it; costs one fp32 dk/dv block of memory.
    Worth it where collectives are asynchronous (GPU, TPU), never on CPU.
    kernel: "xla" (tile sweeps of plain XLA ops, any backend) or "pallas" (one fused Triton
    kernel per block, `ops/pallas_gpu.py`: for GPUs; the local block must be a multiple of 128).
    interpret: run the Pallas kernels in the interpreter, which works on CPU.
    """
    b, length, h, d = q.shape
    if k.shape[:2] != (b, length) or v.shape != k.shape or k.shape[3] != d:
        raise ValueError(f"k/v shape {k.shape}/{v.shape} does not match q {q.shape}")
    config.check_heads(h, k.shape[2], label="")
    cq, ck = chunk_sizes(length, q_chunk=q_chunk, kv_chunk=kv_chunk)
    opts = Options(axis_name, causal, _check_chunk(cq, q_chunk, length, "q_chunk"),
                    _check_chunk(ck, kv_chunk, length, "kv_chunk"),
                   1.0 / math.sqrt(d) if scale is None else float(scale), bool(pipeline_grads),
                   kernel, bool(interpret))
    if token_index is None:
        rank = 0 if axis_name is None else lax.axis_index(axis_name)
        token_index = rank * length + jnp.arange(length, dtype=jnp.int32)
    return ring_core(q, k, v, segment_ids, token_index.astype(jnp.int32), opts)


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
    config.check_heads(h, kvh, label="")
    if segment_ids is not None and segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids shape {segment_ids.shape} is not [batch, seq] = {(b, s)}")
    if mesh is None:
        return
    config.check_batch(b, mesh.shape["dp"] * mesh.shape["fsdp"], label="batch")
    config.check_tp(kvh, mesh.shape["tp"], n_heads=h, label="")
    if impl == "ring":
        config.check_seq(s, mesh.shape["sp"], label="seq")


@functools.partial(jax.jit, static_argnames=("mesh", "impl", "causal", "q_chunk", "kv_chunk",
                                             "layout", "pipeline_grads", "kernel"))
def attention_in_layout(q, k, v, *, mesh: Mesh | None, impl: str = "ring", causal: bool = True,
                        segment_ids=None, q_chunk: int | None = None,
                        kv_chunk: int | None = None, layout: str = "contiguous",
                        pipeline_grads: bool | None = None, kernel: str = "xla"):
    """Attention over global arrays already permuted into `layout` along the sequence.

    This is what the model calls: the data path permutes tokens once, so no layer pays for it.
    Shards batch over (dp, fsdp), heads over tp, and, for impl="ring", the sequence over sp.
    mesh=None runs on the default device without shard_map. Returns [b, s, h, d] in layout order.
    pipeline_grads (see `ring_attention`) defaults to on for a mesh of accelerators; with
    kernel="pallas" on CPU devices the kernels run in the interpreter.
    """
    _check_global(q, k, v, mesh, impl, segment_ids)
    n_sp = sharding.seq_shards(mesh)
    s = q.shape[1]
    index = jnp.asarray(layouts.permutation(layout, s, n_sp), jnp.int32)

    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    if pipeline_grads is None:
        pipeline_grads = mesh is not None and platform != "cpu"
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
    if impl == "ring":  # the chunks the kernel can use on this layout's local blocks
        q_chunk, kv_chunk = chunk_sizes(s // n_sp, q_chunk=q_chunk, kv_chunk=kv_chunk,
                                        layout=layout, n_sp=n_sp)

    def local(q, k, v, seg, idx):
        if impl == "dense":
            return dense_attention(q, k, v, causal=causal, segment_ids=seg, token_index=idx)
        ring = impl == "ring" and mesh is not None  # no mesh: the ring of one is blockwise
        return ring_attention(q, k, v, axis_name="sp" if ring else None, causal=causal,
                              segment_ids=seg, token_index=idx, q_chunk=q_chunk,
                              kv_chunk=kv_chunk, pipeline_grads=pipeline_grads,
                              kernel=kernel, interpret=kernel == "pallas" and platform == "cpu")

    if mesh is None:
        return local(q, k, v, segment_ids, index)
    seq = "length" if impl == "ring" else None  # only the ring splits the sequence
    spec = sharding.logical_to_spec(("batch", seq, "heads", "head_dim"))
    kv_spec = sharding.logical_to_spec(("batch", seq, "kv_heads", "head_dim"))
    seg_spec, index_spec = sharding.logical_to_spec(("batch", seq)), sharding.logical_to_spec((seq,))
    q, k, v = (jax.lax.with_sharding_constraint(x, NamedSharding(mesh, p))
               for x, p in ((q, spec), (k, kv_spec), (v, kv_spec)))
    # pallas_call's outputs carry no record of which mesh axes they vary over, which
    # shard_map's check requires; the specs above already say it.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, kv_spec, kv_spec, seg_spec, index_spec),
                       out_specs=spec, check_vma=kernel != "pallas")
    return fn(q, k, v, segment_ids, index)


def attention(q, k, v, *, mesh: Mesh | None, impl: str = "ring", causal: bool = True,
              segment_ids=None, q_chunk: int | None = None, kv_chunk: int | None = None,
              layout: str = "contiguous", pipeline_grads: bool | None = None,
              kernel: str = "xla"):
    """Exact attention over global arrays in natural token order; differentiable.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids:
    [batch, seq] or None. impl: "ring" (sequence split over sp, k/v blocks rotate), "blockwise"
    or "dense" (whole sequence per device). `layout` balances causal work across the ring; it
    is applied and undone here, so results are in natural order whatever it is. pipeline_grads:
    see `ring_attention` (default: on for a mesh of accelerators); kernel: "xla" or "pallas"
    (see `ring_attention`; for ring and blockwise).
    Raises ValueError, with the numbers, for shapes the mesh cannot split.
    """
    n_sp = sharding.seq_shards(mesh)
    layout = layouts.effective(layout, n_sp)
    if layout != "contiguous":
        q, k, v = (layouts.permute(x, layout, n_sp, axis=1) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = layouts.permute(segment_ids, layout, n_sp, axis=1)
    out = attention_in_layout(q, k, v, mesh=mesh, impl=impl, causal=causal,
                              segment_ids=segment_ids, q_chunk=q_chunk, kv_chunk=kv_chunk,
                              layout=layout, pipeline_grads=pipeline_grads, kernel=kernel)
    return layouts.unpermute(out, layout, n_sp, axis=1) if layout != "contiguous" else out


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
