"""Prefill with ring attention, and an exact decode step over the sp-sharded KV cache.

Prefill is the training forward (ring attention over sp, blockwise MLP) that also returns
every layer's keys and values, which become the cache where they lie (`cache.from_prefill`).

A decode step feeds one token per row. Its query meets every device's cache slice at once:
each sp device computes attention over its own slots, giving a partial output o_s, the
running max m_s and the running sum l_s of its scores, and one log-sum-exp merge across sp
makes the result exact:  M = max_s m_s,  o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s
(a pmax and a psum inside shard_map). Nothing of the cache moves; only [batch, heads,
head_dim] statistics cross devices. The new token's key and value are written only by the
device that owns its decode slot.

Every sp device holds the same new token, so the dense layers would do the same work on
each. Decoding places the weights by `sharding.DECODE_PARAM_RULES` instead: attention
heads, MLP features and the vocabulary split over tp x sp (tensor parallel; one all-reduce
per projection that contracts them), falling back to tp alone for a dimension that tp x sp
does not divide. Only attention is per cache shard.
"""

from __future__ import annotations

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


def _qkv(cfg: model.ModelConfig, h, lp, cos, sin, use):
    """q [b, s, heads, hd], k, v [b, s, kv_heads, hd] with RoPE; `use` turns a weight into an
    operand (gathered for prefill, left in its decode sharding for decoding)."""
    q = jnp.einsum("bsd,dhk->bshk", h, use(lp["wq"], ("embed", "heads", "head_dim")))
    k = jnp.einsum("bsd,dhk->bshk", h, use(lp["wk"], ("embed", "kv_heads", "head_dim")))
    v = jnp.einsum("bsd,dhk->bshk", h, use(lp["wv"], ("embed", "kv_heads", "head_dim")))
    return model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin), v


# ----------------------------------------------------------------------------- prefill


def _prefill_layer(cfg: model.ModelConfig, mesh: Mesh, cos, sin, x, lp):
    dt = jnp.dtype(cfg.dtype)
    use = lambda w, names: model._use(w, names, dt, mesh)
    q, k, v = _qkv(cfg, model.rms_norm(x, lp["attn_norm"], cfg.norm_eps), lp, cos, sin, use)
    q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"), mesh)
    k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"), mesh)
    v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"), mesh)
    # Padding sits after each row's prompt, so causal attention alone keeps it out of the
    # prompt's outputs; its own (unused) keys are never counted by decoding.
    o = attention_in_layout(q, k, v, mesh=mesh, impl="ring", causal=True,
                            **attention_options(cfg))
    x = x + jnp.einsum("bshk,hkd->bsd", o, use(lp["wo"], ("heads", "head_dim", "embed")))
    x = sharding.constrain(x, model.ACT, mesh)
    return sharding.constrain(model._mlp_block(cfg, mesh, x, lp), model.ACT, mesh), (k, v)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "mesh"))
def prefill_jit(cfg, spec: CacheSpec, mesh, params, tokens, positions, lengths, last):
    """`prefill` on placed inputs (`prefill_inputs`)."""
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(model._use(params["embed"], ("vocab", "embed"), dt, mesh), tokens, axis=0)
    x = sharding.constrain(x, model.ACT, mesh)
    cos, sin = model.rope_tables(cfg, positions)
    layer = functools.partial(_prefill_layer, cfg, mesh, cos, sin)
    x, (k, v) = lax.scan(layer, x, params["layers"])
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [b, 1, d]: each row's last token
    h = model.rms_norm(x, params["final_norm"], cfg.norm_eps)[:, 0]
    logits = _lm_head(cfg, params, h, mesh)
    return kv_cache.from_prefill(k, v, lengths, spec, mesh), logits


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
    head = model.lm_head(cfg, params).astype(h.dtype)
    logits = _pin(jnp.einsum("bd,dv->bv", h, head, preferred_element_type=F32),
                  ("batch", "vocab"), mesh)
    return lax.with_sharding_constraint(logits, NamedSharding(mesh, P(BATCH)))


# ----------------------------------------------------------------------------- decode step


def _write(c, new, layer, slot, mine):
    """c [L, b, slots, g, hd] with `new` [b, g, hd] at (layer, slot) where `mine`; touching
    one slot (read, select, write back) keeps the update in place."""
    start = (layer, 0, slot, 0, 0)
    cur = lax.dynamic_slice(c, start, (1, c.shape[1], 1, *c.shape[3:]))
    return lax.dynamic_update_slice(c, jnp.where(mine, new[None, :, None].astype(c.dtype), cur),
                                    start)


def partial_attention(q, k, v, valid):
    """One shard's share: q [b, h, d] (pre-scaled) against k, v [b, n, g, d] where valid
    [b, n]: (o [b, g, h/g, d] unnormalised, m [b, g, h/g] max, l [b, g, h/g] sum), fp32."""
    b, h, d = q.shape
    g = k.shape[2]
    s = jnp.einsum("bgrd,bngd->bgrn", q.reshape(b, g, h // g, d), k, preferred_element_type=F32)
    mask = valid[:, None, None, :]
    s = jnp.where(mask, s, MASK)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)  # a shard with nothing valid adds 0
    o = jnp.einsum("bgrn,bngd->bgrd", p.astype(v.dtype), v, preferred_element_type=F32)
    return o, m, jnp.sum(p, axis=-1)


def merge_partials(o, m, l, axis_name: str):
    """The exact softmax output [b, g, r, d] from every shard's (o, m, l) over `axis_name`."""
    big = lax.pmax(m, axis_name)
    a = jnp.exp(m - big)
    total, out = lax.psum((l * a, o * a[..., None]), axis_name)
    return out / total[..., None]


def merged_attention(q, k_new, v_new, ck, cv, layer, step, lengths, *, spec: CacheSpec,
                     mesh: Mesh):
    """Store decode token `step`'s k/v and attend the cache: (o [b, h, hd], ck, cv).

    q [b, h, hd]; k_new, v_new [b, kv_heads, hd]; ck, cv [L, b, slots, kv_heads, hd] sharded
    as `cache.cache_sharding`; layer, step: int32 scalars; lengths [b] prompt lengths.
    """
    index, is_decode = (jnp.asarray(t) for t in kv_cache.slot_tables(spec))
    scale = 1.0 / np.sqrt(q.shape[-1])

    def local(q, kn, vn, ck, cv, layer, step, lengths, index, is_decode):
        owner, slot = spec.decode_slot(step)
        mine = owner == lax.axis_index("sp")
        ck, cv = _write(ck, kn, layer, slot, mine), _write(cv, vn, layer, slot, mine)
        k = lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
        v = lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
        valid = kv_cache.valid_slots(index, is_decode, lengths, step)
        o = merge_partials(*partial_attention(q * scale, k, v, valid), "sp")
        return o.reshape(q.shape).astype(q.dtype), ck, cv

    heads = P(BATCH, "tp", None)
    cspec = kv_cache.cache_spec_axes(mesh, ck.shape)
    fn = jax.shard_map(local, mesh=mesh, out_specs=(heads, cspec, cspec),
                       in_specs=(heads, heads, heads, cspec, cspec, P(), P(), P(BATCH),
                                 P("sp"), P("sp")))
    return fn(q, k_new, v_new, ck, cv, layer, step, lengths, index, is_decode)


def _decode_layer(cfg: model.ModelConfig, mesh: Mesh, cache: KVCache, cos, sin, carry, xs):
    x, ck, cv = carry
    lp, layer = xs
    dt = jnp.dtype(cfg.dtype)
    use = lambda w, names: w.astype(dt)  # stays split over tp x sp: no gathering per token
    q, k, v = _qkv(cfg, model.rms_norm(x, lp["attn_norm"], cfg.norm_eps), lp, cos, sin, use)
    o, ck, cv = merged_attention(q[:, 0], k[:, 0], v[:, 0], ck, cv, layer, cache.step,
                                 cache.lengths, spec=cache.spec, mesh=mesh)
    o = _pin(o[:, None], ("batch", None, "heads", "head_dim"), mesh)
    x = _pin(x + jnp.einsum("bshk,hkd->bsd", o, use(lp["wo"], ())), ("batch", None, "embed"), mesh)
    h = model.rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    a = jax.nn.silu(jnp.einsum("bsd,df->bsf", h, use(lp["w_gate"], ()))) * \
        jnp.einsum("bsd,df->bsf", h, use(lp["w_up"], ()))
    a = _pin(a, ("batch", None, "mlp"), mesh)
    x = x + jnp.einsum("bsf,fd->bsd", a, use(lp["w_down"], ()))
    return (_pin(x, ("batch", None, "embed"), mesh), ck, cv), None


def decode_step(cfg: model.ModelConfig, params: dict, cache: KVCache, tokens, *,
                mesh: Mesh) -> tuple[KVCache, jax.Array]:
    """Feed tokens [b] (one per row, at positions `cache.positions`): (cache, logits [b, vocab]).

    Pure and jittable; params placed by `place_params`, cache from `prefill` or an earlier
    step (it must have a free decode slot: `cache.step < spec.decode_len`).
    """
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)[:, None]  # [b, 1, d]
    x = _pin(x, ("batch", None, "embed"), mesh)
    cos, sin = model.rope_tables(cfg, cache.positions[:, None])
    layer = functools.partial(_decode_layer, cfg, mesh, cache, cos, sin)
    n_layers = cache.k.shape[0]
    (x, ck, cv), _ = lax.scan(layer, (x, cache.k, cache.v),
                              (params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    h = model.rms_norm(x, params["final_norm"], cfg.norm_eps)[:, 0]
    new = KVCache(ck, cv, cache.lengths, cache.step + 1, cache.spec)
    return new, _lm_head(cfg, params, h, mesh)
