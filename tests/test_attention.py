"""Attention against an independent float64 numpy reference: values, gradients, memory, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringformer.attention import (
    attention,
    attention_in_layout,
    blockwise_attention,
    dense_attention,
    ring_attention,
    tile_counts,
)
from ringformer.mesh import make_mesh


def reference(q, k, v, dout, *, causal, seg):
    """float64 attention and its gradients for the cotangent `dout`, written out by hand."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, s, h, d = q.shape
    g = h // k.shape[2]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # GQA: head i uses kv head i // g
    scores = np.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(d)
    mask = np.ones((b, 1, s, s), bool)
    if causal:
        mask &= np.tril(np.ones((s, s), bool))
    if seg is not None:
        mask &= (seg[:, None, :, None] == seg[:, None, None, :])
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q).reshape(b, s, -1, g, d).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout).reshape(b, s, -1, g, d).sum(3)
    return out, (dq, dk, dv)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_inputs(*, b=2, s=32, h=4, kv=2, d=8, seed=0, n_docs=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, h, d)).astype(dtype)
    k = rng.standard_normal((b, s, kv, d)).astype(dtype)
    v = rng.standard_normal((b, s, kv, d)).astype(dtype)
    dout = rng.standard_normal((b, s, h, d)).astype(dtype)
    # Packed rows: sorted document ids with boundaries at random places, one row per example.
    seg = np.sort(rng.integers(1, n_docs + 1, (b, s)), axis=1).astype(np.int32)
    return q, k, v, dout, seg


def mesh_of(dp=1, fsdp=1, sp=1, tp=1):
    n = dp * fsdp * sp * tp
    return make_mesh({"dp": dp, "fsdp": fsdp, "sp": sp, "tp": tp}, jax.devices()[:n])


def value_and_grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(jnp.asarray(dout))


# (mesh, causal, segments, kv_heads, chunk): every axis of the matrix is covered, and every
# sp size meets dp, fsdp and tp, without compiling the full product.
RING_CASES = [
    (dict(sp=1), True, False, 2, 4),
    (dict(sp=1), False, True, 4, 32),
    (dict(sp=2, dp=2), True, True, 2, 16),
    (dict(sp=2, tp=2, dp=2), False, False, 2, 8),
    (dict(sp=4, fsdp=2), True, True, 4, 4),
    (dict(sp=4, tp=2), False, True, 2, 8),
    (dict(sp=4, dp=2), True, False, 1, 8),
    (dict(sp=8), True, True, 2, 2),
    (dict(sp=8), False, False, 4, 4),
]


@pytest.mark.parametrize("mesh_kw,causal,use_seg,kv,chunk", RING_CASES)
def test_ring_matches_float64_reference(mesh_kw, causal, use_seg, kv, chunk):
    q, k, v, dout, seg = make_inputs(kv=kv)
    seg = seg if use_seg else None
    mesh = mesh_of(**mesh_kw)
    ref_out, ref_grads = reference(q, k, v, dout, causal=causal, seg=seg)

    def fn(q, k, v):
        return attention(q, k, v, mesh=mesh, impl="ring", causal=causal, segment_ids=seg,
                         q_chunk=chunk, kv_chunk=chunk)

    out, grads = value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("mesh_kw,use_seg,layout", [
    (dict(sp=2, dp=2), True, "contiguous"),
    (dict(sp=4, tp=2), False, "zigzag"),
    (dict(sp=8), True, "striped"),
])
def test_pipelined_gradients_match_float64_reference(mesh_kw, use_seg, layout):
    """The accelerator schedule (dk/dv sent one step late) on CPU: same gradients."""
    q, k, v, dout, seg = make_inputs(kv=2)
    seg = seg if use_seg else None
    ref_out, ref_grads = reference(q, k, v, dout, causal=True, seg=seg)

    def fn(q, k, v):
        return attention(q, k, v, mesh=mesh_of(**mesh_kw), impl="ring", segment_ids=seg,
                         q_chunk=4, kv_chunk=4, layout=layout, pipeline_grads=True)

    out, grads = value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("mesh_kw,use_seg,layout,pipeline", [
    (dict(sp=1), True, "contiguous", False),
    (dict(sp=2, dp=2), True, "zigzag", False),
    (dict(sp=4, tp=2), False, "striped", True),
])
def test_pallas_kernel_matches_float64_reference(mesh_kw, use_seg, layout, pipeline):
    """The fused GPU block kernels (ringformer/ops/pallas_gpu.py), run in Pallas's interpreter."""
    q, k, v, dout, seg = make_inputs(kv=2)
    seg = seg if use_seg else None
    ref_out, ref_grads = reference(q, k, v, dout, causal=True, seg=seg)

    def fn(q, k, v):
        return attention(q, k, v, mesh=mesh_of(**mesh_kw), impl="ring", segment_ids=seg,
                         layout=layout, pipeline_grads=pipeline, kernel="pallas")

    out, grads = value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("causal,use_seg,kv,q_chunk,kv_chunk", [
    (True, True, 2, 8, 4),
    (False, False, 4, 32, 32),
    (True, False, 1, 16, 8),
])
def test_blockwise_matches_float64_reference(causal, use_seg, kv, q_chunk, kv_chunk):
    q, k, v, dout, seg = make_inputs(kv=kv)
    seg = seg if use_seg else None
    ref_out, ref_grads = reference(q, k, v, dout, causal=causal, seg=seg)
    fn = jax.jit(lambda q, k, v: blockwise_attention(
        q, k, v, causal=causal, segment_ids=seg, q_chunk=q_chunk, kv_chunk=kv_chunk))
    out, grads = value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 1e-5


def test_blockwise_impl_on_a_mesh_and_dense_agree():
    q, k, v, dout, seg = make_inputs()
    ref_out, _ = reference(q, k, v, dout, causal=True, seg=seg)
    mesh = mesh_of(fsdp=2, tp=2)
    for impl in ("blockwise", "dense"):
        out = attention(q, k, v, mesh=mesh, impl=impl, segment_ids=seg, q_chunk=8, kv_chunk=8)
        assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(dense_attention(q, k, v, segment_ids=seg), ref_out) <= 1e-5


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v, dout, seg = make_inputs(s=64)
    ref_out, ref_grads = reference(q, k, v, dout, causal=True, seg=seg)
    mesh = mesh_of(sp=4, dp=2)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]

    def fn(q, k, v):
        return attention(q, k, v, mesh=mesh, segment_ids=seg, q_chunk=8, kv_chunk=8)

    out, grads = value_and_grads(fn, *bf, jnp.asarray(dout, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (~4e-3 relative per value); fp32 accumulation keeps the
    # error of the whole tensor near that, where bf16 accumulation would drift much further.
    assert rel_err(out, ref_out) <= 1.5e-2
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) <= 3e-2


def test_ring_per_shard_function_inside_shard_map():
    """`ring_attention` is usable directly: natural contiguous blocks, default token index."""
    from jax.sharding import PartitionSpec as P

    q, k, v, dout, _ = make_inputs(b=1, kv=1)
    mesh = mesh_of(sp=8)
    spec = P(None, "sp", None, None)
    fn = jax.jit(jax.shard_map(lambda q, k, v: ring_attention(q, k, v, q_chunk=2, kv_chunk=2),
                               mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
    ref_out, _ = reference(q, k, v, dout, causal=True, seg=None)
    assert rel_err(fn(q, k, v), ref_out) <= 1e-5


def test_tile_skipping_rule_counts_the_causal_triangle():
    """The kernel's skip rule, applied to the layout's token indices, computes exactly the
    tiles on or below the diagonal: a triangle on one device, and for a contiguous ring the
    lopsided pattern where device i has nothing to do at step s > i."""
    assert tile_counts("contiguous", 64, 1, 8).tolist() == [[8 * 9 // 2]]
    counts = tile_counts("contiguous", 64, 4, 4)  # 4 chunks per device
    assert counts[0].tolist() == [10, 10, 10, 10]  # own block: a triangle each
    for step in range(1, 4):
        assert counts[step].tolist() == [0 if dev < step else 16 for dev in range(4)]


# ----------------------------------------------------------------------------- memory


def grad_memory(impl, seq, *, sp=1, chunk=256, h=4, kv=2, d=32):
    """Per-device bytes (temporaries + arguments) of the compiled gradient of attention."""
    mesh = mesh_of(sp=sp)
    qs = jax.ShapeDtypeStruct((1, seq, h, d), jnp.float32)
    ks = jax.ShapeDtypeStruct((1, seq, kv, d), jnp.float32)
    f = jax.jit(jax.grad(lambda q, k, v: attention(
        q, k, v, mesh=mesh, impl=impl, q_chunk=chunk, kv_chunk=chunk).sum(), argnums=(0, 1, 2)))
    m = f.lower(qs, ks, ks).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes


@pytest.fixture(scope="module")
def memory_table():
    t = 1024
    return {
        "blockwise_t": grad_memory("blockwise", t),
        "blockwise_2t": grad_memory("blockwise", 2 * t),
        "ring8_8t": grad_memory("ring", 8 * t, sp=8),
        "dense_t": grad_memory("dense", t),
        "dense_2t": grad_memory("dense", 2 * t),
    }


def test_blockwise_memory_is_linear(memory_table):
    assert memory_table["blockwise_2t"] <= 2.3 * memory_table["blockwise_t"]


def test_ring_memory_per_device_stays_flat_with_context(memory_table):
    assert memory_table["ring8_8t"] <= 2.0 * memory_table["blockwise_t"]


def test_dense_memory_grows_quadratically(memory_table):
    assert memory_table["dense_2t"] >= 3.5 * memory_table["dense_t"]
    assert memory_table["dense_t"] > 4 * memory_table["blockwise_t"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,shapes,message", [
    (dict(sp=4), ((2, 30, 4, 8), (2, 30, 2, 8)), "seq=30 is not divisible by mesh.sp=4"),
    (dict(sp=2), ((2, 32, 6, 8), (2, 32, 4, 8)), "n_heads=6 is not divisible by n_kv_heads=4"),
    (dict(tp=4), ((2, 32, 4, 8), (2, 32, 2, 8)), "n_kv_heads=2 (and n_heads=4) not divisible by mesh.tp=4"),
    (dict(dp=4), ((2, 32, 4, 8), (2, 32, 2, 8)), "batch=2 is not divisible by dp*fsdp=4"),
])
def test_bad_shapes_raise_value_error(kwargs, shapes, message):
    mesh = mesh_of(**kwargs)
    q, k = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=re.escape(message)):
        attention_in_layout(q, k, k, mesh=mesh, impl="ring")


def test_chunk_that_does_not_divide_the_local_block_is_explained():
    q, k, v, _, _ = make_inputs(s=32)
    with pytest.raises(ValueError, match="q_chunk=6 does not divide the local block of 8 tokens"):
        attention(q, k, v, mesh=mesh_of(sp=4), q_chunk=6)
