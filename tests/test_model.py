"""The model on real meshes: parity with transformers, born-sharded params, gradients, memory."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _llama_oracle import VOCAB, build, hf_logits, logn_hooks, random_smearing, rel_err

from ringformer import mesh as meshlib
from ringformer import model, sharding
from ringformer.config import default_config
from ringformer.errors import ConfigError
from ringformer.hf import mapping as hf
from ringformer.ops import layouts

MESHES = {
    "single": None,
    "dp2_sp4": ({"dp": 2, "fsdp": 1, "sp": 4, "tp": 1}, "zigzag"),
    "fsdp2_sp2_tp2": ({"dp": 1, "fsdp": 2, "sp": 2, "tp": 2}, "striped"),
}
RUN = dict(dtype="float32", attention=model.AttentionConfig(impl="ring", q_chunk=8, kv_chunk=8),
           mlp_chunk=8, loss_chunk=8)


def _mesh_and_cfg(name, cfg):
    if MESHES[name] is None:
        return None, cfg
    shape, lay = MESHES[name]
    return meshlib.make_mesh(shape), cfg.with_attention(layout=lay)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA LLaMA with llama3 rope scaling (8 heads, 2 kv heads: tp=2 splits both)."""
    d = str(tmp_path_factory.mktemp("gqa_llama3"))
    ref = build("gqa_llama3", d, seed=3)
    cfg, params = hf.load_llama(d, **RUN)
    return ref, cfg, params


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(2).integers(0, VOCAB, (2, 64))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_logits_match_transformers_on_mesh(llama, tokens, mesh_name):
    ref, cfg, params = llama
    mesh, cfg = _mesh_and_cfg(mesh_name, cfg)
    err = rel_err(model.logits(cfg, params, tokens, mesh=mesh), hf_logits(ref, tokens))
    assert err < 1e-4, err


# ----------------------------------------------------------------------------- smeared keys


@pytest.fixture(scope="module", params=[1, 2], ids=["one_token", "two_tokens"])
def smeared(llama, request):
    """The oracle LLaMA with smeared keys (model.smear_tokens 1 or 2), random mixing weights
    far from the initial even mix, and the hooks that smear transformers' model alike."""
    ref, cfg, params = llama
    extra, hooks = random_smearing(ref, cfg, request.param, seed=5)
    params = {**params, "layers": {**params["layers"],
                                   **{k: jnp.asarray(v) for k, v in extra.items()}}}
    cfg = dataclasses.replace(cfg, smear_keys=True, smear_tokens=request.param)
    return ref, cfg, params, hooks


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_smeared_keys_match_transformers_with_smearing_hooks(smeared, tokens, mesh_name):
    """On every layout (zigzag and striped put a token's predecessor on another device)."""
    ref, cfg, params, hooks = smeared
    mesh, cfg = _mesh_and_cfg(mesh_name, cfg)
    with hooks():
        want = hf_logits(ref, tokens)
    assert rel_err(want, hf_logits(ref, tokens)) > 1e-2  # smearing changes the model
    err = rel_err(model.logits(cfg, params, tokens, mesh=mesh), want)
    assert err < 1e-4, err


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_logn_queries_match_transformers_with_scaling_hooks(llama, tokens, mesh_name):
    """Each query scaled by its own position's log, on every layout (zigzag and striped
    put late positions on every device)."""
    ref, cfg, params = llama
    mesh, cfg = _mesh_and_cfg(mesh_name, dataclasses.replace(cfg, logn_base=8))
    with logn_hooks(ref, 8):
        want = hf_logits(ref, tokens)
    assert rel_err(want, hf_logits(ref, tokens)) > 1e-3  # 10x the tolerance below
    err = rel_err(model.logits(cfg, params, tokens, mesh=mesh), want)
    assert err < 1e-4, err


def test_logn_scale_counts_positions_in_its_document(llama, tokens):
    """A packed document's queries are scaled by their positions in it, not in the row."""
    _, cfg, params = llama
    mesh, cfg = _mesh_and_cfg("dp2_sp4", dataclasses.replace(cfg, logn_base=8))
    batch = _packed_batch(tokens)
    packed = model.logits(cfg, params, tokens, mesh=mesh, segment_ids=batch["segment_ids"],
                          positions=batch["positions"])
    alone = model.logits(cfg, params, tokens[:, 40:])
    assert rel_err(np.asarray(packed)[:, 40:], alone) < 1e-4


@pytest.mark.parametrize("mesh_name", ["single", "dp2_sp4"])
def test_smeared_keys_stay_inside_their_document(smeared, tokens, mesh_name):
    """A packed document's first key mixes in nothing of the document before it."""
    _, cfg, params, _ = smeared
    mesh, cfg = _mesh_and_cfg(mesh_name, cfg)
    batch = _packed_batch(tokens)
    packed = model.logits(cfg, params, tokens, mesh=mesh, segment_ids=batch["segment_ids"],
                          positions=batch["positions"])
    alone = model.logits(cfg, params, tokens[:, 40:])
    assert rel_err(np.asarray(packed)[:, 40:], alone) < 1e-4


@pytest.mark.parametrize("layout,n", [("contiguous", 1), ("contiguous", 4), ("striped", 4),
                                      ("zigzag", 2), ("zigzag", 4)])
def test_previous_token_is_the_natural_predecessor_in_its_document(layout, n):
    s = 32
    natural = np.arange(1, s + 1, dtype=np.float32)[None, :, None]  # token j holds j + 1
    seg = (np.arange(s) >= 20).astype(np.int32)[None]
    x, sg = (layouts.permute(a, layout, n, axis=1) for a in (natural, seg))
    prev = model.previous_token(jnp.asarray(x), jnp.asarray(sg), layout, n)
    got = layouts.unpermute(np.asarray(prev), layout, n, axis=1)[0, :, 0]
    want = np.arange(s, dtype=np.float32)  # token j's predecessor holds j
    want[20] = 0  # the second document's first token has none
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- gradients


def _packed_batch(tokens):
    """Two documents per row (40 + 24 tokens) with positions restarting and the last token of
    each document masked, as the data pipeline packs them; natural order."""
    b, s = tokens.shape
    seg = np.concatenate([np.zeros(40), np.ones(s - 40)]).astype(np.int32)
    pos = np.concatenate([np.arange(40), np.arange(s - 40)]).astype(np.int32)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(s, bool)
    mask[[39, s - 1]] = False
    tile = lambda x: np.broadcast_to(x, (b, s)).copy()
    return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            "segment_ids": tile(seg), "positions": tile(pos), "loss_mask": tile(mask)}


def _loss_and_grads(cfg, params, batch, mesh):
    if mesh is not None:
        n_sp = sharding.seq_shards(mesh)
        batch = {k: layouts.permute(v, cfg.attention.layout, n_sp) for k, v in batch.items()}
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        params = jax.device_put(params, sharding.param_shardings(
            jax.eval_shape(lambda: params), model.param_logical_axes(cfg), mesh))

    def f(p, b):
        total, n = model.loss_fn(cfg, p, b, mesh=mesh)
        return total / n

    return jax.jit(jax.value_and_grad(f))(params, batch)


@pytest.fixture(scope="module")
def single_device_grads(llama, tokens):
    _, cfg, params = llama
    return _loss_and_grads(cfg, params, _packed_batch(tokens), None)


def _hf_document_loss(ref, tokens):
    """HF's mean next-token loss over each of `_packed_batch`'s documents alone, as a torch
    scalar that can be differentiated."""
    import torch

    total, count = 0.0, 0
    for lo, hi in ((0, 40), (40, 64)):
        logits = ref(torch.as_tensor(np.asarray(tokens[:, lo:hi], np.int64))).logits[:, :-1]
        target = torch.as_tensor(np.asarray(tokens[:, lo + 1:hi], np.int64))
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), target.reshape(-1), reduction="sum")
        count += target.numel()
    return total / count


def test_loss_fn_matches_transformers_loss(llama, tokens, single_device_grads):
    """Mean packed-document loss equals HF's next-token loss over each document alone."""
    ref, _, _ = llama
    np.testing.assert_allclose(single_device_grads[0], _hf_document_loss(ref, tokens).item(),
                               rtol=1e-5)


@pytest.mark.parametrize("mesh_name", ["dp2_sp4", "fsdp2_sp2_tp2"])
def test_smeared_keys_train_alike_on_every_mesh(smeared, tokens, mesh_name):
    """The packed loss equals transformers' (with smearing hooks) per document, and a ring's
    gradients, the smearing weights' included, equal one device's."""
    ref, cfg, params, hooks = smeared
    batch = _packed_batch(tokens)
    loss, grads = _loss_and_grads(cfg, params, batch, None)
    with hooks():
        np.testing.assert_allclose(loss, _hf_document_loss(ref, tokens).item(), rtol=1e-5)
    mesh, ring_cfg = _mesh_and_cfg(mesh_name, cfg)
    ring_loss, ring_grads = _loss_and_grads(ring_cfg, params, batch, mesh)
    np.testing.assert_allclose(ring_loss, loss, rtol=1e-5)
    for name in {"smear", "key_taps", "query_taps"} & set(grads["layers"]):
        assert float(jnp.abs(grads["layers"][name]).max()) > 0, name
    for a, b in zip(jax.tree.leaves(ring_grads), jax.tree.leaves(grads), strict=True):
        assert rel_err(a, b) < 1e-4


def test_gradients_match_transformers(llama, tokens, single_device_grads, tmp_path):
    """Every parameter's gradient equals torch autograd's through transformers' LLaMA: an
    independent check of the hand-written backward passes (attention, RMSNorm)."""
    from safetensors.numpy import load_file

    ref, cfg, _ = llama
    ref.zero_grad()
    _hf_document_loss(ref, tokens).backward()
    # save_llama's name and layout mapping applies to a gradient tree as to parameters.
    hf.save_llama(cfg, single_device_grads[1], str(tmp_path))
    ours = load_file(str(tmp_path / "model.safetensors"))
    theirs = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        assert rel_err(ours[name], want) < 1e-4, name


@pytest.mark.parametrize("mesh_name,pipeline,kernel", [
    ("dp2_sp4", "auto", "xla"), ("fsdp2_sp2_tp2", "on", "xla"), ("fsdp2_sp2_tp2", "auto", "pallas")])
def test_gradients_agree_across_meshes(llama, tokens, single_device_grads, mesh_name, pipeline,
                                       kernel):
    """`pipeline="on"` runs the accelerators' backward schedule (dk/dv sent a step late);
    `kernel="pallas"` the fused GPU kernels, in Pallas's interpreter."""
    _, cfg, params = llama
    cfg = cfg.with_attention(pipeline_grads=pipeline, kernel=kernel)
    mesh, cfg = _mesh_and_cfg(mesh_name, cfg)
    value, grads = _loss_and_grads(cfg, params, _packed_batch(tokens), mesh)
    ref_value, ref_grads = single_device_grads
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = np.asarray(ref_grads[path[0].key] if len(path) == 1
                          else ref_grads[path[0].key][path[1].key])
        err = np.max(np.abs(np.asarray(g) - want)) / np.max(np.abs(want))
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def test_remat_policies_give_the_same_gradients(llama, tokens, single_device_grads):
    """Default is "full"; "dots_saveable" saves the most, so it differs the most in what the
    backward recomputes. The other names only need to build (compiling each costs time)."""
    _, cfg, params = llama
    batch = _packed_batch(tokens)
    _, grads = _loss_and_grads(dataclasses.replace(cfg, remat="dots_saveable"), params, batch,
                               None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, single_device_grads[1])
    for policy in ("none", "nothing_saveable", "dots_with_no_batch_dims"):
        c = dataclasses.replace(cfg, remat=policy)
        jax.jit(jax.grad(lambda p, b, c=c: model.loss_fn(c, p, b, mesh=None)[0])).lower(
            params, batch)


# ----------------------------------------------------------------------------- parameters


def test_params_are_born_sharded():
    cfg = model.ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=96, **RUN)
    mesh = meshlib.make_mesh({"dp": 1, "fsdp": 2, "sp": 2, "tp": 2})
    rng = jax.random.key(0)
    abstract = jax.eval_shape(model.init_params, cfg, rng)
    shardings = sharding.param_shardings(abstract, model.param_logical_axes(cfg), mesh)
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=shardings)(cfg, rng)
    L, k = cfg.n_layers, cfg.head_dim
    expected = {  # embed splits 4 ways (fsdp x sp); heads, kv_heads, mlp and vocab halve (tp)
        "embed": (64, 16), "lm_head": (16, 64), "final_norm": (64,),
        "layers": {"wq": (L, 16, 2, k), "wk": (L, 16, 1, k), "wv": (L, 16, 1, k),
                   "wo": (L, 2, k, 16), "w_gate": (L, 16, 48), "w_up": (L, 16, 48),
                   "w_down": (L, 48, 16), "attn_norm": (L, 64), "mlp_norm": (L, 64)},
    }
    shard_shapes = jax.tree.map(lambda x: x.addressable_shards[0].data.shape, params)
    assert shard_shapes == jax.tree.map(tuple, expected, is_leaf=lambda x: isinstance(x, tuple))
    # fsdp x sp x tp = 8 distinct pieces of a matrix: no device holds a duplicate
    assert len({str(s.index) for s in params["layers"]["wq"].addressable_shards}) == 8
    # norms are tiny and stay whole on every device
    assert len({str(s.index) for s in params["final_norm"].addressable_shards}) == 1
    # same values as an unsharded init: sharding changes placement only
    plain = model.init_params(cfg, rng)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, plain)
    assert params["embed"].dtype == jnp.float32


@pytest.mark.parametrize("smear,tokens,names", [(False, 1, set()), (True, 1, {"smear"}),
                                                 (True, 2, {"key_taps", "query_taps"})])
def test_param_axes_mirror_params(smear, tokens, names):
    cfg = model.ModelConfig(tie_embeddings=True, smear_keys=smear, smear_tokens=tokens)
    abstract = jax.eval_shape(model.init_params, cfg, jax.random.key(0))
    axes = model.param_logical_axes(cfg)
    assert "lm_head" not in abstract
    assert {"smear", "key_taps", "query_taps"} & set(abstract["layers"]) == names
    jax.tree.map(lambda x, names: len(names) == x.ndim or pytest.fail(str(names)), abstract, axes,
                 is_leaf=lambda n: isinstance(n, tuple))


# ----------------------------------------------------------------------------- dtypes, memory


def test_bf16_compute_fp32_params(llama, tokens):
    _, cfg, params = llama
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
    h = model.hidden_states(bf, params, jnp.asarray(tokens), positions=pos)
    assert h.dtype == jnp.bfloat16
    err = rel_err(model.logits(bf, params, tokens), model.logits(cfg, params, tokens))
    assert 0 < err < 5e-2, err


def test_training_step_memory_far_below_full_logits():
    """loss + grad at 16K tokens compiles to far less than the [b, s, vocab] fp32 logits."""
    b, s = 1, 16384
    # LLaMA's 32K vocabulary: full logits would be 2000 MiB; everything else is O(s * dim).
    cfg = model.ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=128, dtype="float32", mlp_chunk=512, loss_chunk=256, remat="full",
                            attention=model.AttentionConfig(impl="blockwise", q_chunk=512, kv_chunk=512))
    params = jax.eval_shape(model.init_params, cfg, jax.random.key(0))
    ints = jax.ShapeDtypeStruct((b, s), jnp.int32)
    batch = {"tokens": ints, "targets": ints, "segment_ids": ints, "positions": ints,
             "loss_mask": jax.ShapeDtypeStruct((b, s), jnp.bool_)}
    step = jax.jit(jax.grad(lambda p, x: model.loss_fn(cfg, p, x, mesh=None)[0]))
    temp = step.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    full_logits = b * s * cfg.vocab_size * 4
    assert temp < full_logits / 8, (temp, full_logits)


# ----------------------------------------------------------------------------- config


def test_model_config_from_config_and_round_trip():
    c = default_config()
    c.model.dim, c.attention.impl, c.attention.kv_chunk = 128, "blockwise", 64
    cfg = model.ModelConfig.from_config(c)
    assert (cfg.dim, cfg.vocab_size) == (128, 259)
    assert (cfg.attention.impl, cfg.attention.kv_chunk) == ("blockwise", 64)
    assert cfg.attention.layout == c.attention.layout == "zigzag"  # one default for both
    assert hash(cfg) == hash(model.ModelConfig.from_config(c))
    again = model.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"attention\.layout='diagonal'"):
        cfg.with_attention(layout="diagonal")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        dataclasses.replace(cfg, n_kv_heads=3)
    with pytest.raises(ConfigError, match="rope_scaling"):
        dataclasses.replace(cfg, rope_scaling="yarn")


def test_model_config_reads_the_flat_attention_keys_of_old_dicts():
    """ModelConfig dicts written before the attention settings were nested still load."""
    old = {**{k: v for k, v in model.ModelConfig().to_dict().items() if k != "attention"},
           "dim": 128, "attn_impl": "blockwise", "attn_layout": "striped", "q_chunk": 64,
           "kv_chunk": 32, "attn_pipeline_grads": "off", "attn_kernel": "xla"}
    cfg = model.ModelConfig.from_dict(old)
    assert cfg.dim == 128
    assert cfg.attention == model.AttentionConfig(impl="blockwise", layout="striped", q_chunk=64,
                                                  kv_chunk=32, pipeline_grads="off")


def test_model_config_defaults_are_the_config_defaults():
    """Written once: a ModelConfig built from default_config() is the default ModelConfig."""
    assert model.ModelConfig.from_config(default_config()) == model.ModelConfig()
