"""LLaMA decoder as pure functions over a nested dict of parameters.

Why not Linen or NNX modules: everything the rest of the stack needs from a model is a pytree
and a function. The trainer builds parameters born sharded with
`jax.jit(init_params, out_shardings=param_shardings(eval_shape(...), param_logical_axes(cfg)))`,
which needs a plain params tree and a *matching* tree of logical axis names; Hugging Face
import/export is a name-by-name mapping onto that same dict; and layers stacked on a leading
"layers" axis run under a plain `lax.scan` with `jax.checkpoint(policy=...)`. Modules would
add `nn.scan`/`nn.remat` lifting, variable collections and metadata boxes to get exactly the
same thing, so flax is not needed here at all.

Shapes (b batch, s sequence, d dim, h heads, g kv_heads, k head_dim, f ffn_dim, v vocab):
  embed [v, d]; layers.{wq [L, d, h, k], wk/wv [L, d, g, k], wo [L, h, k, d],
  w_gate/w_up [L, d, f], w_down [L, f, d], attn_norm/mlp_norm [L, d]}; final_norm [d];
  lm_head [d, v] when embeddings are not tied.

Sequences arrive in the sharding layout's order (the data path permutes them once), with
explicit `positions`, so RoPE, packed documents and permuted layouts are all exact. Model code
names axes logically ("batch", "length", "embed", ...); `ringformer.sharding` maps them to the
mesh. Parameters stay in `param_dtype`; matmuls run in `dtype`; norms, RoPE angles and softmax
statistics are fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from ringformer import loss as losses
from ringformer import sharding
from ringformer.attention import attention_in_layout
from ringformer.config import AttentionConfig as AttentionConfig
from ringformer.config import ModelConfig
from ringformer.ops import layouts

F32 = jnp.float32
ACT = ("batch", "length", "embed")

# config.attention.pipeline_grads -> attention's argument (None: decided by the mesh's platform).
_PIPELINE_GRADS = {"auto": None, "on": True, "off": False}

# ModelConfig and AttentionConfig live in ringformer.config (jax-free, with every other
# setting) and are re-exported here. A static pytree node: `jax.eval_shape(init_params, cfg, rng)` passes it
# through untraced.
jax.tree_util.register_static(ModelConfig)


# ----------------------------------------------------------------------------- parameters


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names per parameter, mirroring `init_params`' tree."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "wq": ("layers", "embed", "heads", "head_dim"),
            "wk": ("layers", "embed", "kv_heads", "head_dim"),
            "wv": ("layers", "embed", "kv_heads", "head_dim"),
            "wo": ("layers", "heads", "head_dim", "embed"),
            "mlp_norm": ("layers", "norm"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        },
        "final_norm": ("norm",),
    }
    if cfg.smear_keys and cfg.smear_tokens == 1:
        axes["layers"]["smear"] = ("layers", "kv_heads")
    elif cfg.smear_keys:
        axes["layers"]["key_taps"] = ("layers", "kv_heads", None, "head_dim")
        axes["layers"]["query_taps"] = ("layers", "heads", None, "head_dim")
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> dict:
    L, d, h, g, k, f, v = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.ffn_dim, cfg.vocab_size)
    shapes = {
        "embed": (v, d),
        "layers": {
            "attn_norm": (L, d), "wq": (L, d, h, k), "wk": (L, d, g, k), "wv": (L, d, g, k),
            "wo": (L, h, k, d), "mlp_norm": (L, d), "w_gate": (L, d, f), "w_up": (L, d, f),
            "w_down": (L, f, d),
        },
        "final_norm": (d,),
    }
    if cfg.smear_keys and cfg.smear_tokens == 1:
        shapes["layers"]["smear"] = (L, g)
    elif cfg.smear_keys:  # taps: own, then 1 and (keys) 2 tokens back
        shapes["layers"]["key_taps"] = (L, g, cfg.smear_tokens + 1, k)
        shapes["layers"]["query_taps"] = (L, h, cfg.smear_tokens, k)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters in `param_dtype`: normal(init_std) matrices, unit norm weights.

    Output projections (wo, w_down) are scaled by 1/sqrt(2 n_layers) so the residual stream's
    variance does not grow with depth (GPT-2 style).
    """
    dtype = jnp.dtype(cfg.param_dtype)
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(rng, len(flat))
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    leaves = []
    for path, shape, key in zip(paths, flat, keys, strict=True):
        if "norm" in path:
            leaves.append(jnp.ones(shape, dtype))
        elif "smear" in path or "taps" in path:  # an even mix: sigmoid(0), softmax(0)
            leaves.append(jnp.zeros(shape, dtype))
        else:
            std = out_std if ("'wo'" in path or "'w_down'" in path) else cfg.init_std
            leaves.append((std * jax.random.normal(key, shape, F32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- building blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, weight, eps: float):
    """RMSNorm in fp32 (the mean of squares of bf16 activations loses too much), cast back.

    The gradient is written out by hand so the backward keeps only x and the per-token
    1/rms: autodiff of the two broadcasting multiplies saves 1/rms and the weight broadcast
    to x's full shape, two [b, s, dim] fp32 buffers per norm alive at the step's peak.
    """
    return _rms_norm_fwd(x, weight, eps)[0]


def _rms_norm_fwd(x, weight, eps: float):
    x32 = x.astype(F32)
    r = lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * r * weight.astype(F32)).astype(x.dtype), (x, weight, r)


def _rms_norm_bwd(eps: float, res, dy):
    # The barrier (tied to dy, so it cannot run early) keeps the broadcasts of r and the
    # weight below from being shared with the forward's (CSE) or scheduled early: either way
    # they would sit materialised, [b, s, dim] each, from the recomputed forward until here.
    x, weight, r, dy = lax.optimization_barrier((*res, dy))
    x32, g = x.astype(F32), dy.astype(F32)
    gw = g * weight.astype(F32)
    # d/dx [x r w] with r = (mean(x^2) + eps)^-1/2: r (g w) - x r^3 mean(g w x). The per-token
    # factors are combined before they meet [b, s, dim] tensors, and dw contracts r as a
    # matmul operand, so no [b, s, dim] broadcast of r is ever materialised.
    c = r * jnp.square(r) * jnp.mean(gw * x32, axis=-1, keepdims=True)
    dx = r * gw - c * x32
    dw = jnp.einsum("...t,...td->d", r[..., 0], g * x32)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32), with transformers' linear/llama3 scaling."""
    k = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
        factor = cfg.rope_scaling_factor
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


class Rope(NamedTuple):
    """RoPE tables [b, s, head_dim] in fp32: the keys' cos and sin, and the queries', which
    also carry `logn_scale` (the same arrays when it is off: RoPE is linear per position)."""

    cos: jax.Array
    sin: jax.Array
    q_cos: jax.Array
    q_sin: jax.Array


def logn_scale(cfg: ModelConfig, positions):
    """max(1, ln(p + 1) / ln(logn_base)) [b, s] (fp32) for positions [b, s]: a query at p
    attends over p + 1 keys, and the margin a match needs over them grows as their log."""
    n = positions.astype(F32) + 1.0
    return jnp.maximum(1.0, jnp.log(n) / np.log(cfg.logn_base))


def rope_tables(cfg: ModelConfig, positions) -> Rope:
    """The RoPE tables for integer positions [b, s] (rotate-half layout)."""
    angles = positions.astype(F32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if not cfg.logn_base:
        return Rope(cos, sin, cos, sin)
    scale = logn_scale(cfg, positions)[..., None]
    return Rope(cos, sin, cos * scale, sin * scale)


def apply_rope(x, cos, sin):
    """Rotate x [b, s, heads, head_dim] by position; HF LLaMA's rotate-half convention."""
    x32 = x.astype(F32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def predecessor_slots(layout: str, s: int, n_sp: int) -> tuple[np.ndarray, np.ndarray]:
    """For each slot of `s` tokens in `layout` order over `n_sp` shards: the slot of its
    token's predecessor in natural order, and whether it has one (the first token has not;
    its entry points at itself)."""
    perm = layouts.permutation(layout, s, n_sp)
    return np.argsort(perm)[np.maximum(perm - 1, 0)], perm > 0


def previous_token(x, segment_ids, layout: str, n_sp: int):
    """For x [b, s, ...] in `layout` order over `n_sp` shards: each token's predecessor in its
    document (natural order), zeros for a document's first token.

    The layout is a static permutation, so the predecessor's slot is known at trace time: one
    slot back within a block (a shift, which sharding turns into a one-token exchange between
    neighbours), a gather where a layout's blocks meet.
    """
    s = x.shape[1]
    src, has = predecessor_slots(layout, s, n_sp)
    if np.array_equal(src[1:], np.arange(s - 1)):
        prev = jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))
    else:
        prev = jnp.take(x, jnp.asarray(src), axis=1)
    keep = jnp.asarray(has)[None, :]
    if segment_ids is not None:
        keep = keep & (segment_ids == jnp.take(segment_ids, jnp.asarray(src), axis=1))
    return prev * keep.reshape(keep.shape + (1,) * (x.ndim - 2)).astype(x.dtype)


def smear_keys(k, prev, weight):
    """Keys [..., kv_heads, head_dim] mixed with their predecessors' (`previous_token`):
    sigmoid(weight [kv_heads]) of a key is its own. A key that carries the token before it
    lets one head match "the token after the last X" by content, the induction step a plain
    model must build from two layers (Olsson et al. 2022, smeared keys)."""
    own = jax.nn.sigmoid(weight.astype(F32))[:, None]
    return (own * k.astype(F32) + (1 - own) * prev.astype(F32)).astype(k.dtype)


def mix_taps(x, back, logits):
    """x [..., n, hd] mixed per channel with the same tensor tokens back (`back`: a tuple,
    nearest first, each like x): softmax over logits [n, taps, hd] of the taps (own, then
    back). Different channels of one head can so carry different tokens."""
    w = jax.nn.softmax(logits.astype(F32), axis=-2)
    out = w[:, 0] * x.astype(F32)
    for i, h in enumerate(back):
        out = out + w[:, i + 1] * h.astype(F32)
    return out.astype(x.dtype)


def smear_sequence_keys(cfg: ModelConfig, mesh: Mesh | None, k, lp, segment_ids):
    """A layer's keys [b, s, kv_heads, hd] in the attention layout, smeared when
    `cfg.smear_keys` (else as they are): training's and prefill's one path. The weight is
    used in fp32, so a bf16 model mixes in the same share as an fp32 one."""
    if not cfg.smear_keys:
        return k
    back = history(cfg, mesh, k, segment_ids, cfg.smear_tokens)
    if cfg.smear_tokens == 1:
        return smear_keys(k, back[0], _use(lp["smear"], ("kv_heads",), F32, mesh))
    return mix_taps(k, back, _use(lp["key_taps"], ("kv_heads", None, "head_dim"), F32, mesh))


def smear_sequence_queries(cfg: ModelConfig, mesh: Mesh | None, q, lp, segment_ids):
    """A layer's queries [b, s, heads, hd] mixed with the one before them when keys reach two
    tokens back (`cfg.smear_tokens` 2), so a query says both tokens a key matches."""
    if not (cfg.smear_keys and cfg.smear_tokens > 1):
        return q
    back = history(cfg, mesh, q, segment_ids, cfg.smear_tokens - 1)
    return mix_taps(q, back, _use(lp["query_taps"], ("heads", None, "head_dim"), F32, mesh))


def history(cfg: ModelConfig, mesh: Mesh | None, x, segment_ids, n: int) -> tuple:
    """x's predecessors 1..n tokens back in their document (zeros before its start)."""
    out = []
    for _ in range(n):
        x = previous_token(x, segment_ids, cfg.attention.layout, sharding.seq_shards(mesh))
        out.append(x)
    return tuple(out)


def _use(w, names: tuple[str, ...], dtype, mesh: Mesh | None):
    """A weight as a matmul operand: cast to the compute dtype and gathered over fsdp and sp.

    Parameters live with "embed" sharded over fsdp x sp (ZeRO-3); saying explicitly that the
    operand has it whole makes XLA all-gather the weight (and reduce-scatter its gradient)
    instead of guessing a layout for the activations, which it does badly for gathers.
    """
    return sharding.constrain(w.astype(dtype), names, mesh)


def _mlp_block(cfg: ModelConfig, mesh: Mesh | None, x, lp):
    """x + SwiGLU(RMSNorm(x)), over sequence chunks: live activations are [b, chunk, ffn].

    Every part is token-wise, so each chunk is read from the residual stream and its result
    written back in place: the step holds no normed copy of x, no stacked chunk inputs or
    outputs, and no zero-filled output buffer, only x and one chunk's work. Chunks are strided
    (chunk j = tokens i*n + j, as `sharding.split_seq_chunks`) so each stays spread evenly over
    the sp devices and the loop needs no communication.
    """
    dt = jnp.dtype(cfg.dtype)
    wg = _use(lp["w_gate"], ("embed", "mlp"), dt, mesh)
    wu = _use(lp["w_up"], ("embed", "mlp"), dt, mesh)
    wd = _use(lp["w_down"], ("mlp", "embed"), dt, mesh)

    def chunk_fn(xc):
        h = rms_norm(xc, lp["mlp_norm"], cfg.norm_eps)
        g = checkpoint_name(jnp.einsum("bcd,df->bcf", h, wg), "mlp_gate")
        u = checkpoint_name(jnp.einsum("bcd,df->bcf", h, wu), "mlp_up")
        a = sharding.constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"), mesh)
        return xc + checkpoint_name(jnp.einsum("bcf,fd->bcd", a, wd), "mlp_down")

    b, s, d = x.shape
    n = sharding.num_seq_chunks(s, cfg.mlp_chunk, mesh)
    if n == 1:
        return chunk_fn(x)
    chunk_fn = jax.checkpoint(chunk_fn, prevent_cse=False,
                              policy=jax.checkpoint_policies.nothing_saveable)
    # [b, s, d] -> [b, s/n, n, d]: the sp sharding stays on s/n, the chunk axis is local.
    xr = sharding.constrain(x.reshape(b, s // n, n, d), ("batch", "length", None, "embed"), mesh)

    def body(j, xr):
        y = chunk_fn(lax.dynamic_index_in_dim(xr, j, axis=2, keepdims=False))
        return lax.dynamic_update_index_in_dim(xr, y, j, axis=2)

    return lax.fori_loop(0, n, body, xr).reshape(b, s, d)


def _attention(cfg: ModelConfig, mesh: Mesh | None, x, lp, rope: Rope, segment_ids):
    dt = jnp.dtype(cfg.dtype)
    q = jnp.einsum("bsd,dhk->bshk", x, _use(lp["wq"], ("embed", "heads", "head_dim"), dt, mesh))
    k = jnp.einsum("bsd,dhk->bshk", x, _use(lp["wk"], ("embed", "kv_heads", "head_dim"), dt, mesh))
    v = jnp.einsum("bsd,dhk->bshk", x, _use(lp["wv"], ("embed", "kv_heads", "head_dim"), dt, mesh))
    q, k, v = (checkpoint_name(x, n) for x, n in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
    a = cfg.attention
    k = smear_sequence_keys(cfg, mesh, k, lp, segment_ids)
    q = smear_sequence_queries(cfg, mesh, q, lp, segment_ids)
    q, k = apply_rope(q, rope.q_cos, rope.q_sin), apply_rope(k, rope.cos, rope.sin)
    q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"), mesh)
    k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"), mesh)
    v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"), mesh)
    # Without a mesh there is no ring to pass blocks around: ring is exactly blockwise there.
    impl = "blockwise" if mesh is None and a.impl == "ring" else a.impl
    o = attention_in_layout(q, k, v, mesh=mesh, impl=impl, causal=True,
                            segment_ids=segment_ids, q_chunk=a.q_chunk, kv_chunk=a.kv_chunk,
                            layout=a.layout, pipeline_grads=_PIPELINE_GRADS[a.pipeline_grads],
                            kernel=a.kernel)
    o = checkpoint_name(o, "attn_out")
    out = jnp.einsum("bshk,hkd->bsd", o, _use(lp["wo"], ("heads", "head_dim", "embed"), dt, mesh))
    return checkpoint_name(out, "o_proj")


# Outputs of the layer's own matmuls, tagged with checkpoint_name. "dots" policies are built
# from these names rather than JAX's dots_saveable, which would also save the per-tile score
# matmuls inside blockwise/ring attention: the O(seq^2) memory the kernel exists to avoid.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down")


def remat_policy(name: str):
    """The jax.checkpoint policy for a config name (None for "none": no rematerialisation).

    full / nothing_saveable: keep only each layer's input, recompute the rest.
    dots_saveable: also keep every projection output and the attention output, so the
      backward recomputes only norms, RoPE and activations (most memory, least compute).
    dots_with_no_batch_dims: keep the projections but recompute attention (its output
      depends on the whole sequence; its recompute is the one expensive part left).
    """
    names = {
        "full": None, "nothing_saveable": None,
        "dots_saveable": (*PROJECTIONS, "attn_out"),
        "dots_with_no_batch_dims": PROJECTIONS,
    }
    if name == "none":
        return None
    if names[name] is None:
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_only_these_names(*names[name])


def _remat(fn, name: str):
    policy = remat_policy(name)
    if policy is None:
        return fn
    # prevent_cse=False is safe (and faster) because the function runs inside lax.scan.
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


# ----------------------------------------------------------------------------- public API


def hidden_states(cfg: ModelConfig, params: dict, tokens, *, positions, segment_ids=None,
                  mesh: Mesh | None = None):
    """Final-normed hidden states [b, s, dim] in `dtype`.

    tokens, positions, segment_ids: [b, s] in the attention layout's order (contiguous:
    natural order). positions drive RoPE; segment_ids (or None) keep packed documents apart.
    """
    dt = jnp.dtype(cfg.dtype)
    x = jnp.take(_use(params["embed"], ("vocab", "embed"), dt, mesh), tokens, axis=0)
    x = sharding.constrain(x, ACT, mesh)
    rope = Rope(*(sharding.constrain(t, ("batch", "length", "head_dim"), mesh)
                  for t in rope_tables(cfg, positions)))

    def layer(x, lp):
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        x = sharding.constrain(x + _attention(cfg, mesh, h, lp, rope, segment_ids), ACT, mesh)
        x = sharding.constrain(_mlp_block(cfg, mesh, x, lp), ACT, mesh)
        return x, None

    x, _ = lax.scan(_remat(layer, cfg.remat), x, params["layers"])
    return rms_norm(x, params["final_norm"], cfg.norm_eps)


def lm_head(cfg: ModelConfig, params: dict):
    """The output projection [dim, vocab]: the embedding's transpose when tied."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def loss_fn(cfg: ModelConfig, params: dict, batch: Mapping[str, Any], *,
            mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """(summed next-token loss, number of counted tokens) for one batch in layout order.

    batch: tokens, targets, segment_ids, positions, loss_mask, each [b, s]. Logits are never
    materialised beyond one `loss_chunk` per device.
    """
    h = hidden_states(cfg, params, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch.get("segment_ids"), mesh=mesh)
    return losses.chunked_cross_entropy(h, lm_head(cfg, params), batch["targets"],
                                        batch["loss_mask"], chunk=cfg.loss_chunk, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def _logits(cfg: ModelConfig, params, tokens, positions, segment_ids, mesh):
    h = hidden_states(cfg, params, tokens, positions=positions, segment_ids=segment_ids,
                      mesh=mesh)
    head = _use(lm_head(cfg, params), ("embed", "vocab"), h.dtype, mesh)
    out = jnp.einsum("bsd,dv->bsv", h, head, preferred_element_type=F32)
    return sharding.constrain(out, ("batch", "length", "vocab"), mesh)


def logits(cfg: ModelConfig, params: dict, tokens, *, mesh: Mesh | None = None,
           segment_ids=None, positions=None) -> jax.Array:
    """fp32 logits [b, s, vocab] for tokens [b, s] in natural order. Small inputs only.

    positions default to arange(s) per row. With a mesh, inputs are permuted into the
    configured layout (and the result back), and params are placed by the sharding rules
    (a no-op when they already are).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    n_sp = sharding.seq_shards(mesh)
    lay = layouts.effective(cfg.attention.layout, n_sp)
    if lay != "contiguous":
        tokens, positions = (layouts.permute(x, lay, n_sp) for x in (tokens, positions))
        if segment_ids is not None:
            segment_ids = layouts.permute(segment_ids, lay, n_sp)
    run_cfg = cfg.with_attention(layout=lay)
    if mesh is not None:
        shard = sharding.param_shardings(jax.eval_shape(lambda: params),
                                         param_logical_axes(cfg), mesh)
        params = jax.device_put(params, shard)
        place = sharding.batch_sharding(mesh)
        tokens, positions = jax.device_put(tokens, place), jax.device_put(positions, place)
        if segment_ids is not None:
            segment_ids = jax.device_put(segment_ids, place)
    out = _logits(run_cfg, params, tokens, positions, segment_ids, mesh)
    return layouts.unpermute(out, lay, n_sp) if lay != "contiguous" else out
