"""Prefill with ring attention, and an exact decode step over the sp-sharded KV cache.

Prefill is the training forward (ring attention over sp, blockwise MLP) that also returns
every layer's keys and values, which become the cache where they lie (`cache.from_prefill`).

A decode step feeds one token per row. Its query meets every device's cache slice at once:
each sp device computes attention over its own slots, giving a partial output o_s, the
running max m_s and the running sum l_s of its scores, and one log-sum-exp merge across sp
makes the result exact:  M = max_s m_s,  o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s
(one all-gather of (o_s, m_s, l_s) inside shard_map, then every device merges). Nothing of
the cache moves; only [batch, heads, head_dim + 2] statistics cross devices. The new token's
key and value are written only by the device that owns its decode slot.

Every sp device holds the same new token, so the dense layers would do the same work on
each. Decoding places the weights by `sharding.DECODE_PARAM_RULES` instead: the attention
projections' head_dim, the MLP features and the vocabulary split over sp (heads, MLP and
vocabulary over tp too; tensor parallel): per layer one all-gather of q|k|v, one of the
attention statistics and one all-reduce after each of wo and w_down. A dimension that the
axes do not divide stays whole. Only attention is per cache shard.

Per token nothing is copied: a decode loop takes the weights and the cache as per-layer
arrays (`unstack_layers`, `unstack_cache`, once before the loop), the layers are unrolled,
and attention reads the cache in its stored layout (`partial_attention`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ringformer import model, sharding
from ringformer.attention import attention_in_layout
from ringformer.generate import cache as kv_cache
from ringformer.generate.cache import CacheSpec, KVCache

F32 = jnp.float32
MASK = -1e30
BATCH = sharding.BATCH_AXES


def attention_options(cfg: model.ModelConfig) -> dict:
    """The ring kernel's options from the model config: the one place that reads them."""
    a = cfg.attention
    return {"layout": a.layout, "q_chunk": a.q_chunk, "kv_chunk": a.kv_chunk, "kernel": a.kernel}


def _pin(x, names, mesh: Mesh):
    """Constrain by the decode rules (dense features over tp x sp where they divide)."""
    spec = sharding.fitted_spec(names, x.shape, mesh, rules=sharding.DECODE_PARAM_RULES)
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def decode_shardings(cfg: model.ModelConfig, params: dict, mesh: Mesh):
    """NamedShardings of the params for decoding (`sharding.DECODE_PARAM_RULES`)."""
    return sharding.param_shardings(jax.eval_shape(lambda: params),
                                    model.param_logical_axes(cfg), mesh,
                                    rules=sharding.DECODE_PARAM_RULES)


def place_params(cfg: model.ModelConfig, params: dict, mesh: Mesh) -> dict:
    """params (host or device arrays) placed for decoding; prefill gathers what it needs."""
    def put(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s)
        x = np.asarray(x)  # every process holds the same host values and gives its devices theirs
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, params, decode_shardings(cfg, params, mesh))


def _qkv(cfg: model.ModelConfig, mesh: Mesh, h, lp, rope: model.Rope, use):
    """Prefill's q [b, s, heads, hd], k, v [b, s, kv_heads, hd] with RoPE (smeared as in
    training), and the keys and queries before both; `use` turns a weight into an operand
    (gathered as training does)."""
    raw_q = jnp.einsum("bsd,dhk->bshk", h, use(lp["wq"], ("embed", "heads", "head_dim")))
    raw = jnp.einsum("bsd,dhk->bshk", h, use(lp["wk"], ("embed", "kv_heads", "head_dim")))
    v = jnp.einsum("bsd,dhk->bshk", h, use(lp["wv"], ("embed", "kv_heads", "head_dim")))
    k = model.smear_sequence_keys(cfg, mesh, raw, lp, None)  # one prompt per row: no segments
    q = model.smear_sequence_queries(cfg, mesh, raw_q, lp, None)
    return (model.apply_rope(q, rope.q_cos, rope.q_sin), model.apply_rope(k, rope.cos, rope.sin),
            v, raw, raw_q)


def _prompt_tail(cfg: model.ModelConfig, mesh: Mesh, x, last, n: int):
    """x [b, s, ...]'s newest n tokens of every row's prompt (layout slot `last` [b] and the
    n - 1 before it), [b, n, ...] newest first, zeros before a prompt's start; None when n
    is 0. Slot by slot through the layout's predecessor table: n gathers of one token per
    row, where shifting the whole prompt (`model.history`) would copy it n - 1 times."""
    if n == 0:
        return None
    src, has = (jnp.asarray(a) for a in model.predecessor_slots(
        cfg.attention.layout, x.shape[1], sharding.seq_shards(mesh)))
    shape = (-1,) + (1,) * (x.ndim - 1)
    out, slot, live = [], last, jnp.ones(last.shape, bool)
    for _ in range(n):
        y = jnp.take_along_axis(x, slot.reshape(shape), axis=1)[:, 0]
        out.append(y * live.reshape(shape[:-1]).astype(x.dtype))
        live, slot = live & has[slot], src[slot]
    return jnp.stack(out, axis=1)


# ----------------------------------------------------------------------------- prefill


def _prefill_layer(cfg: model.ModelConfig, mesh: Mesh, rope: model.Rope, last, x, lp):
    dt = jnp.dtype(cfg.dtype)
    use = lambda w, names: model._use(w, names, dt, mesh)
    q, k, v, raw, raw_q = _qkv(cfg, mesh, model.rms_norm(x, lp["attn_norm"], cfg.norm_eps), lp,
                               rope, use)
    # The prompt's last raw keys (and queries), which the first decoded token's mix in.
    smear = cfg.smear_tokens if cfg.smear_keys else 0
    prev_k = _prompt_tail(cfg, mesh, raw, last, smear)
    prev_q = _prompt_tail(cfg, mesh, raw_q, last, max(smear - 1, 0))
    q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"), mesh)
    k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"), mesh)
    v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"), mesh)
    # Padding sits after each row's prompt, so causal attention alone keeps it out of the
    # prompt's outputs; its own (unused) keys are never counted by decoding.
    o = attention_in_layout(q, k, v, mesh=mesh, impl="ring", causal=True,
                            **attention_options(cfg))
    x = x + jnp.einsum("bshk,hkd->bsd", o, use(lp["wo"], ("heads", "head_dim", "embed")))
    x = sharding.constrain(x, model.ACT, mesh)
    return sharding.constrain(model._mlp_block(cfg, mesh, x, lp), model.ACT, mesh), (k, v, prev_k, prev_q)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "mesh"))
def prefill_jit(cfg, spec: CacheSpec, mesh, params, tokens, positions, lengths, last):
    """`prefill` on placed inputs (`prefill_inputs`)."""
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(model._use(params["embed"], ("vocab", "embed"), dt, mesh), tokens, axis=0)
    x = sharding.constrain(x, model.ACT, mesh)
    layer = functools.partial(_prefill_layer, cfg, mesh, model.rope_tables(cfg, positions), last)
    x, (k, v, prev_k, prev_q) = lax.scan(layer, x, params["layers"])
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [b, 1, d]: each row's last token
    h = model.rms_norm(x, params["final_norm"], cfg.norm_eps)[:, 0]
    logits = _lm_head(cfg, params, h, mesh)
    return kv_cache.from_prefill(k, v, lengths, spec, mesh, prev_k, prev_q), logits


def prefill_inputs(tokens, lengths, spec: CacheSpec, mesh: Mesh) -> tuple[jax.Array, ...]:
    """Host prompts -> `_prefill`'s placed inputs: tokens and positions [b, s] in layout
    order, lengths [b], and the layout index of each row's last prompt token [b]."""
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    b, s = tokens.shape
    perm = kv_cache.slot_tables(CacheSpec(spec.sp, s, 0, spec.layout))[0]
    inv = np.argsort(perm).astype(np.int32)
    rows, vec = sharding.batch_sharding(mesh), NamedSharding(mesh, P(BATCH))
    put = lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: x[i])
    return (put(np.ascontiguousarray(tokens[:, perm]), rows),
            put(np.ascontiguousarray(np.broadcast_to(perm, (b, s))), rows),
            put(lengths, vec), put(inv[lengths - 1], vec))


def prefill(cfg: model.ModelConfig, params: dict, tokens, lengths, *, mesh: Mesh,
            spec: CacheSpec) -> tuple[KVCache, jax.Array]:
    """Run right-padded prompts through the model: (cache, next-token logits [b, vocab] fp32).

    tokens: [b, spec.prefill_len] int32 in natural order, row r's prompt in its first
    lengths[r] entries (lengths [b], each >= 1); cfg: a prefill config (`api.prefill_config`);
    params: placed by `place_params`. Ring attention over sp, the training kernel.
    """
    return prefill_jit(cfg, spec, mesh, params, *prefill_inputs(tokens, lengths, spec, mesh))


def _lm_head(cfg: model.ModelConfig, params: dict, h, mesh: Mesh):
    """fp32 logits [b, vocab] of final hidden states [b, d], whole on every device."""
    if cfg.tie_embeddings:  # contract with embed [vocab, d] as it lies: no transposed copy
        logits = jnp.einsum("bd,vd->bv", h, params["embed"].astype(h.dtype),
                            preferred_element_type=F32)
    else:
        logits = jnp.einsum("bd,dv->bv", h, params["lm_head"].astype(h.dtype),
                            preferred_element_type=F32)
    logits = _pin(logits, ("batch", "vocab"), mesh)
    return lax.with_sharding_constraint(logits, NamedSharding(mesh, P(BATCH)))


# ----------------------------------------------------------------------------- decode step


def _write(c, new, slot, mine):
    """c [b, slots, g, hd] with `new` [b, g, hd] at `slot` where `mine`; touching one slot
    (read, select, write back) keeps the update in place."""
    start = (0, slot, 0, 0)
    cur = lax.dynamic_slice(c, start, (c.shape[0], 1, *c.shape[2:]))
    return lax.dynamic_update_slice(c, jnp.where(mine, new[:, None].astype(c.dtype), cur), start)


def partial_attention(q, k, v, valid):
    """One shard's share: q [b, h, d] (pre-scaled) against k, v [b, n, g, d] where valid
    [b, n]: (o [b, g, h/g, d] unnormalised, m [b, g, h/g] max, l [b, g, h/g] sum), fp32.

    Written as multiply-and-reduce over the cache as it lies ([b, n, g, d]): the einsums of
    a matmul formulation made XLA copy every layer's cache slice into [g, d, n] and
    [g, n, d] on every token; these read it once, in place.
    """
    b, h, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, 1, g, h // g, d).astype(F32)
    s = jnp.sum(qg * k[:, :, :, None].astype(F32), axis=-1)  # [b, n, g, r]
    mask = valid[:, :, None, None]
    s = jnp.where(mask, s, MASK)
    m = jnp.max(s, axis=1)  # [b, g, r]
    p = jnp.where(mask, jnp.exp(s - m[:, None]), 0.0)  # a shard with nothing valid adds 0
    o = jnp.sum(p[..., None] * v[:, :, :, None].astype(F32), axis=1)  # [b, g, r, d]
    return o, m, jnp.sum(p, axis=1)


def merge_partials(o, m, l, axis_name: str):
    """The exact softmax output [b, g, r, d] from every shard's (o, m, l) over `axis_name`:
    one all-gather of the statistics, then each device merges them (one collective, where a
    pmax and then a psum are two)."""
    d = o.shape[-1]
    packed = jnp.concatenate([o, m[..., None], l[..., None]], axis=-1)
    every = lax.all_gather(packed, axis_name, to="invarying")  # [shards, ..., d + 2]
    o, m, l = every[..., :d], every[..., d], every[..., d + 1]
    a = jnp.exp(m - jnp.max(m, axis=0))
    return jnp.sum(o * a[..., None], axis=0) / jnp.sum(l * a, axis=0)[..., None]


def merged_attention(q, k_new, v_new, ck, cv, step, lengths, *, spec: CacheSpec, mesh: Mesh):
    """Attend one layer's cache and decode token `step`, and store its k/v: (o [b, h, hd],
    ck, cv).

    q [b, h, hd]; k_new, v_new [b, kv_heads, hd]; ck, cv: the layer's [b, slots, kv_heads,
    hd] sharded as `cache.cache_sharding`; step: int32 scalar; lengths [b] prompt lengths.
    """
    index, is_decode = (jnp.asarray(t) for t in kv_cache.slot_tables(spec))
    scale = 1.0 / np.sqrt(q.shape[-1])

    def local(q, kn, vn, ck, cv, step, lengths, index, is_decode):
        owner, slot = spec.decode_slot(step)
        mine = owner == lax.axis_index("sp")
        # Write first, then attend what was written: reading the cache before writing it
        # would make XLA copy the cache to keep the write in place.
        ck, cv = _write(ck, kn, slot, mine), _write(cv, vn, slot, mine)
        valid = kv_cache.valid_slots(index, is_decode, lengths, step)
        o = merge_partials(*partial_attention(q * scale, ck, cv, valid), "sp")
        return o.reshape(q.shape).astype(q.dtype), ck, cv

    heads = P(BATCH, "tp", None)
    cspec = P(*kv_cache.cache_spec_axes(mesh, (1, *ck.shape))[1:])  # one layer
    fn = jax.shard_map(local, mesh=mesh, out_specs=(heads, cspec, cspec),
                       in_specs=(heads, heads, heads, cspec, cspec, P(), P(BATCH),
                                 P("sp"), P("sp")))
    return fn(q, k_new, v_new, ck, cv, step, lengths, index, is_decode)


def _decode_qkv(cfg: model.ModelConfig, mesh: Mesh, h, lp, rope: model.Rope, pk, pq):
    """q [b, heads, hd], k, v [b, kv_heads, hd], whole over sp, with RoPE (smeared with pk
    and pq, `KVCache.prev_k` and prev_q, with model.smear_keys), and the histories with this
    token's raw k and q put first. The projections use the weights as placed (head_dim over
    sp): each device computes its slice of every head, then one all-gather over sp (per
    tensor when tp > 1) makes them whole."""
    dt = jnp.dtype(cfg.dtype)
    q, k, v = (jnp.einsum("bd,dhk->bhk", h, lp[w].astype(dt)) for w in ("wq", "wk", "wv"))
    whole = lambda x: sharding.constrain(x, ("batch", "heads", None), mesh)  # tp stays
    if mesh.shape["tp"] == 1:
        qkv = whole(jnp.concatenate([q, k, v], axis=1))
        q, k, v = jnp.split(qkv, [q.shape[1], q.shape[1] + k.shape[1]], axis=1)
    else:
        q, k, v = whole(q), whole(k), whole(v)
    rope_k = lambda x: model.apply_rope(x[:, None], rope.cos, rope.sin)[:, 0]
    rope_q = lambda x: model.apply_rope(x[:, None], rope.q_cos, rope.q_sin)[:, 0]
    if not cfg.smear_keys:
        return rope_q(q), rope_k(k), v, None, None
    back = lambda hist: tuple(hist[:, i] for i in range(hist.shape[1]))
    push = lambda hist, x: jnp.concatenate([x[:, None], hist[:, :-1]], axis=1)
    if cfg.smear_tokens == 1:
        return (rope_q(q), rope_k(model.smear_keys(k, pk[:, 0], lp["smear"])), v, push(pk, k),
                None)
    sk = model.mix_taps(k, back(pk), lp["key_taps"])
    sq = model.mix_taps(q, back(pq), lp["query_taps"])
    return rope_q(sq), rope_k(sk), v, push(pk, k), push(pq, q)


def _decode_layer(cfg: model.ModelConfig, mesh: Mesh, cache: KVCache, rope: model.Rope, x, lp,
                  ck, cv, pk, pq):
    """One layer for one token per row: x [b, d] (whole on every device) and the layer's
    cache (pk, pq: its `KVCache.prev_k`, prev_q) -> (x, ck, cv, pk, pq). Weights stay split
    over tp x sp: no gathering per token."""
    dt = jnp.dtype(cfg.dtype)
    q, k, v, pk, pq = _decode_qkv(cfg, mesh, model.rms_norm(x, lp["attn_norm"], cfg.norm_eps),
                                  lp, rope, pk, pq)
    o, ck, cv = merged_attention(q, k, v, ck, cv, cache.step, cache.lengths, spec=cache.spec,
                                 mesh=mesh)
    o = _pin(o, ("batch", "heads", "head_dim"), mesh)  # each device's slice: no data moves
    x = _pin(x + jnp.einsum("bhk,hkd->bd", o, lp["wo"].astype(dt)), ("batch", "embed"), mesh)
    h = model.rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    a = jax.nn.silu(jnp.einsum("bd,df->bf", h, lp["w_gate"].astype(dt))) * \
        jnp.einsum("bd,df->bf", h, lp["w_up"].astype(dt))
    a = _pin(a, ("batch", "mlp"), mesh)
    x = x + jnp.einsum("bf,fd->bd", a, lp["w_down"].astype(dt))
    return _pin(x, ("batch", "embed"), mesh), ck, cv, pk, pq


MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def unstack_layers(params: dict, dtype=None) -> dict:
    """params with "layers" as a tuple of per-layer dicts (already one: returned as is), the
    matrices (and embed / lm_head) cast to the compute `dtype` if given.

    A decode loop should call this once, outside its loop: a layer loop over the stacked
    weights slices (copies) every layer's weights out of the stack on every token, i.e. reads
    and writes all the weights once more per token than the matmuls need; a cast inside the
    loop would convert (copy) them on every token too. The step casts to the same dtype, so
    casting here changes nothing in the result.
    """
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    cast = (lambda w: w) if dtype is None else (lambda w: w.astype(dtype))
    n = jax.tree.leaves(layers)[0].shape[0]
    per = tuple({k: cast(w[i]) if k in MATRICES else w[i] for k, w in layers.items()}
                for i in range(n))
    heads = {k: cast(params[k]) for k in ("embed", "lm_head") if k in params}
    return {**params, **heads, "layers": per}


def unstack_cache(cache: KVCache) -> KVCache:
    """The cache with k and v as tuples of per-layer arrays [b, slots, kv_heads, hd]: a loop
    of steps carries it so (`decode_loop`), since a layer's slice of a stacked cache, read
    after the earlier layers wrote theirs, is copied."""
    if isinstance(cache.k, tuple):
        return cache
    split = lambda x: tuple(x[i] for i in range(x.shape[0]))
    prev_k, prev_q = (None if x is None else split(x) for x in (cache.prev_k, cache.prev_q))
    return dataclasses.replace(cache, k=split(cache.k), v=split(cache.v), prev_k=prev_k,
                               prev_q=prev_q)


def decode_step(cfg: model.ModelConfig, params: dict, cache: KVCache, tokens, *,
                mesh: Mesh) -> tuple[KVCache, jax.Array]:
    """Feed tokens [b] (one per row, at positions `cache.positions`): (cache, logits [b, vocab]).

    Pure and jittable; params placed by `place_params`, cache from `prefill` or an earlier
    step (it must have a free decode slot: `cache.step < spec.decode_len`). Inside a loop of
    steps, pass both through `unstack_layers` / `unstack_cache` once before it (the step
    keeps a per-layer cache per-layer): each layer then reads its weights and its cache where
    they lie instead of copying them out of the stacked arrays on every token.
    """
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)  # [b, d]
    x = _pin(x, ("batch", "embed"), mesh)
    rope = model.rope_tables(cfg, cache.positions[:, None])  # [b, 1, hd]
    per_layer = unstack_cache(cache)
    ks, vs = list(per_layer.k), list(per_layer.v)
    pks = list(per_layer.prev_k or (None,) * len(ks))
    pqs = list(per_layer.prev_q or (None,) * len(ks))
    for i, lp in enumerate(unstack_layers(params)["layers"]):  # unrolled
        x, ks[i], vs[i], pks[i], pqs[i] = _decode_layer(cfg, mesh, cache, rope, x, lp, ks[i], vs[i],
                                                        pks[i], pqs[i])
    h = model.rms_norm(x, params["final_norm"], cfg.norm_eps)
    stacked = not isinstance(cache.k, tuple)
    join = lambda xs: None if xs[0] is None else (jnp.stack(xs) if stacked else tuple(xs))
    new = KVCache(join(ks), join(vs), cache.lengths, cache.step + 1, cache.spec, join(pks),
                  join(pqs))
    return new, _lm_head(cfg, params, h, mesh)
