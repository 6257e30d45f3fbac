"""Generation against transformers' greedy generate, and the merged decode step against dense
float64 attention over the whole cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _llama_oracle import VOCAB, build, hf_logits, logn_hooks, random_smearing
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringformer.generate import Generator, Sampling
from ringformer.generate import cache as kv_cache
from ringformer.generate.decode import merged_attention
from ringformer.hf import mapping as hf
from ringformer.mesh import make_mesh

T = 8  # new tokens
PROMPT_LENGTHS = (3, 9, 17, 30)


def _mesh(sp=1, tp=1, fsdp=1):
    sizes = {"dp": 1, "fsdp": fsdp, "sp": sp, "tp": tp}
    return make_mesh(sizes, devices=jax.devices()[:fsdp * sp * tp])


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, VOCAB, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """variant -> (ringformer cfg, params, torch model). Weights are scaled up so the logits
    are far from ties: greedy must then agree token for token, not by luck of rounding."""
    import torch

    out = {}
    for v in ("gqa_tied_linear", "mha", "gqa_llama3"):
        d = str(tmp_path_factory.mktemp(v))
        ref = build(v, d)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "norm" not in name:
                    p.mul_(4.0)
        ref.save_pretrained(d)
        cfg, params = hf.load_llama(d, dtype="float32")
        out[v] = (cfg, params, ref)
    return out


def _hf_greedy(ref, prompt):
    import torch

    ids = torch.as_tensor([prompt])
    with torch.no_grad():
        seq = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=T, min_new_tokens=T, eos_token_id=None, pad_token_id=0)
    return seq[0, len(prompt):].tolist()


# GQA + tied + theta 5e5 (linear scaling), MHA at theta 1e4, GQA with llama3 scaling; the
# meshes cover sp = 1, 2, 4, tp = 2 and rows split over fsdp.
@pytest.mark.parametrize("variant,sp,tp,fsdp", [
    ("gqa_tied_linear", 1, 1, 1), ("mha", 4, 1, 1), ("gqa_llama3", 2, 2, 2)])
def test_greedy_matches_transformers(oracles, prompts, variant, sp, tp, fsdp):
    cfg, params, ref = oracles[variant]
    got = Generator(cfg, params, mesh=_mesh(sp, tp, fsdp)).generate(prompts, max_new_tokens=T)
    for p, g in zip(prompts, got.tokens, strict=True):
        assert g.tolist() == _hf_greedy(ref, p)


@pytest.mark.parametrize("smear_tokens,sp,tp,fsdp", [
    (1, 1, 1, 1), (1, 4, 1, 1), (1, 2, 2, 2), (2, 1, 1, 1), (2, 4, 1, 1), (2, 2, 2, 2)])
def test_greedy_with_smeared_keys_matches_whole_sequence_forwards(oracles, prompts,
                                                                  smear_tokens, sp, tp, fsdp):
    """The cache carries each layer's last raw keys (and queries), so a decoded token's key
    (and query) is smeared as a whole-sequence forward smears it (transformers with smearing
    hooks, no cache), one and two tokens back; prompts of one and two tokens too, whose
    missing predecessors are zeros."""
    prompts = [*prompts, [5], [7, 11]]
    cfg, params, ref = oracles["gqa_llama3"]
    extra, hooks = random_smearing(ref, cfg, smear_tokens, seed=6)
    params = {**params, "layers": {**params["layers"],
                                   **{k: jnp.asarray(v) for k, v in extra.items()}}}
    cfg = dataclasses.replace(cfg, smear_keys=True, smear_tokens=smear_tokens)
    got = Generator(cfg, params, mesh=_mesh(sp, tp, fsdp)).generate(prompts, max_new_tokens=T)
    with hooks():
        for p, g in zip(prompts, got.tokens, strict=True):
            seq = list(p)
            for _ in range(T):
                seq.append(int(hf_logits(ref, np.array([seq]))[0, -1].argmax()))
            assert g.tolist() == seq[len(p):]


@pytest.mark.parametrize("sp,tp,fsdp", [(1, 1, 1), (4, 1, 1), (2, 2, 2)])
def test_greedy_with_logn_queries_matches_whole_sequence_forwards(oracles, prompts, sp, tp,
                                                                  fsdp):
    """Prefill scales each prompt query by its position's log and every decoded token by its
    own, as a whole-sequence forward does (transformers with scaling hooks, no cache)."""
    cfg, params, ref = oracles["gqa_llama3"]
    cfg = dataclasses.replace(cfg, logn_base=4)
    got = Generator(cfg, params, mesh=_mesh(sp, tp, fsdp)).generate(prompts, max_new_tokens=T)
    with logn_hooks(ref, 4):
        for p, g in zip(prompts, got.tokens, strict=True):
            seq = list(p)
            for _ in range(T):
                seq.append(int(hf_logits(ref, np.array([seq]))[0, -1].argmax()))
            assert g.tolist() == seq[len(p):]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_merged_step_equals_dense_attention(layout):
    """One decode step's write and attention over a random sharded cache, against float64
    softmax over every slot the row may see."""
    sp, tp, L, b, g, r, d = 4, 2, 2, 2, 2, 3, 8
    spec = kv_cache.make_spec(16, 9, sp, layout)
    mesh = _mesh(sp, tp)
    rng = np.random.default_rng(0)
    ck, cv = (rng.standard_normal((L, b, spec.length, g, d)).astype(np.float32) for _ in "kv")
    q = rng.standard_normal((b, g * r, d)).astype(np.float32)
    kn, vn = (rng.standard_normal((b, g, d)).astype(np.float32) for _ in "kv")
    lengths, step, layer = np.array([5, 16], np.int32), 5, 1
    shard = kv_cache.cache_sharding(mesh, ck.shape)
    fn = jax.jit(lambda *a: merged_attention(*a, spec=spec, mesh=mesh))
    put = lambda c: jax.device_put(c[layer], NamedSharding(mesh, P(*shard.spec[1:])))
    o, ck2, _ = fn(q, kn, vn, put(ck), put(cv), jnp.int32(step), lengths)  # one layer's cache

    index, is_decode = kv_cache.slot_tables(spec)
    slot = int(np.flatnonzero(is_decode & (index == step))[0])
    ck[layer, :, slot], cv[layer, :, slot] = kn, vn
    np.testing.assert_array_equal(np.asarray(ck2), ck[layer])
    valid = np.where(is_decode[None], index[None] <= step, index[None] < lengths[:, None])
    k64, v64 = ck[layer].astype(np.float64), cv[layer].astype(np.float64)
    qg = q.reshape(b, g, r, d).astype(np.float64) / np.sqrt(d)
    s = np.einsum("bgrd,bngd->bgrn", qg, k64)
    s = np.where(valid[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bgrn,bngd->bgrd", p, v64).reshape(b, g * r, d)
    np.testing.assert_allclose(np.asarray(o), want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sampler(oracles):
    cfg, params, _ = oracles["gqa_tied_linear"]
    return Generator(cfg, params, mesh=_mesh(sp=2, tp=2))


def _run(gen, prompts, **kw):
    return [g.tolist() for g in gen.generate(prompts, max_new_tokens=T,
                                             sampling=Sampling(**kw)).tokens]


def test_sampling_seed_reproduces(sampler, prompts):
    a = _run(sampler, prompts, temperature=1.5, seed=7)
    assert a == _run(sampler, prompts, temperature=1.5, seed=7)
    assert a != _run(sampler, prompts, temperature=1.5, seed=8)


def test_greedy_special_cases(sampler, prompts):
    greedy = _run(sampler, prompts)
    assert _run(sampler, prompts, temperature=2.0, top_k=1, seed=3) == greedy
    assert _run(sampler, prompts, temperature=0.0, top_p=0.5, seed=3) == greedy
    assert _run(sampler, prompts, temperature=2.0, top_p=1e-6, seed=3) == greedy


def test_eos_ends_a_row(sampler, prompts):
    greedy = _run(sampler, prompts)
    eos = greedy[0][2]
    got = sampler.generate(prompts, max_new_tokens=T, eos_id=eos).tokens
    for g, want in zip(got, greedy, strict=True):
        cut = want.index(eos) if eos in want else len(want)
        assert g.tolist() == want[:cut]
