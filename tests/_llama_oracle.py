"""Test-only oracle: random transformers LlamaForCausalLM models built locally (torch CPU)."""

from __future__ import annotations

import contextlib

import numpy as np

VOCAB, DIM, FFN, LAYERS = 101, 64, 96, 2

# name -> (heads, kv_heads, rope_theta, tied, rope_parameters extra)
VARIANTS = {
    "mha": (4, 4, 10000.0, False, None),
    "gqa_tied_linear": (4, 2, 500000.0, True, {"rope_type": "linear", "factor": 2.0}),
    "gqa_llama3": (8, 2, 10000.0, False,
                   {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mha_tied_theta": (4, 4, 500000.0, True, None),
}


def build(variant: str, out_dir: str, seed: int = 0, **save_kw):
    """Save a random HF LLaMA of `variant` to out_dir; return the torch model (eval, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv, theta, tied, rope = VARIANTS[variant]
    rope_parameters = {"rope_type": "default", **(rope or {}), "rope_theta": theta}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN,
                      num_hidden_layers=LAYERS, num_attention_heads=heads,
                      num_key_value_heads=kv, rope_parameters=rope_parameters,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, **save_kw)
    return model


def hf_logits(model, tokens: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if position_ids is None else {"position_ids": torch.as_tensor(position_ids)}
        return model(torch.as_tensor(np.asarray(tokens, np.int64)), **kw).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@contextlib.contextmanager
def smear_hooks(model, weights: np.ndarray):
    """Smeared keys (ringformer's model.smear_keys) on a transformers LLaMA, written
    independently: each layer's k_proj output, before RoPE, becomes sigmoid(w) k_t +
    (1 - sigmoid(w)) k_(t-1) per kv head (zeros before the first token). weights: [layers,
    kv_heads]. For whole sequences only (no KV cache: a cached step sees one token)."""
    import torch

    def hook(w):
        own = torch.sigmoid(torch.as_tensor(w, dtype=torch.float32))[:, None]

        def smear(_module, _inputs, k):
            b, s, _ = k.shape
            k4 = k.reshape(b, s, len(w), -1)
            prev = torch.nn.functional.pad(k4[:, :-1], (0, 0, 0, 0, 1, 0))
            return (own * k4 + (1 - own) * prev).reshape(b, s, -1)
        return smear

    handles = [layer.self_attn.k_proj.register_forward_hook(hook(w))
               for layer, w in zip(model.model.layers, np.asarray(weights), strict=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def tap_hooks(model, key_logits: np.ndarray, query_logits: np.ndarray):
    """Two-token smearing (ringformer's model.smear_tokens=2) on a transformers LLaMA, written
    independently: each layer's k_proj output, before RoPE, becomes per channel
    sum_i softmax(key_logits)[i] * k_(t-i), i = 0, 1, 2, and its q_proj output
    sum_i softmax(query_logits)[i] * q_(t-i), i = 0, 1 (zeros before the first token).
    key_logits: [layers, kv_heads, 3, head_dim]; query_logits: [layers, heads, 2, head_dim].
    For whole sequences only."""
    import torch

    def hook(logits):
        w = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)  # [n, taps, hd]

        def mix(_module, _inputs, x):
            b, s, _ = x.shape
            x4 = x.reshape(b, s, w.shape[0], -1)
            out = torch.zeros_like(x4)
            for i in range(w.shape[1]):
                back = torch.nn.functional.pad(x4[:, :s - i], (0, 0, 0, 0, i, 0))
                out = out + w[:, i] * back
            return out.reshape(b, s, -1)
        return mix

    handles = []
    for layer, kl, ql in zip(model.model.layers, key_logits, query_logits, strict=True):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(kl)))
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(ql)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def logn_hooks(model, base: int):
    """Log-n queries (ringformer's model.logn_base) on a transformers LLaMA, written
    independently: each layer's q_proj output at token t becomes max(1, log_base(t + 1))
    times itself; before RoPE, which is linear, so the same as after. Whole sequences from
    position 0 only (no KV cache, no position_ids)."""
    import math

    import torch

    def scale(_module, _inputs, q):
        t = torch.arange(1, q.shape[1] + 1, dtype=torch.float64)
        s = torch.clamp(torch.log(t) / math.log(base), min=1.0).to(q.dtype)
        return q * s[None, :, None]

    handles = [layer.self_attn.q_proj.register_forward_hook(scale)
               for layer in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def random_smearing(model, cfg, smear_tokens: int, seed: int):
    """Mixing weights for ringformer's smeared keys (model.smear_tokens 1 or 2), random and
    far from the initial even mix, as numpy arrays to add to its params' layers, and a
    factory of the context manager that smears transformers' `model` alike. `cfg` is
    ringformer's model config (its layer, head and head-dim counts)."""
    rng = np.random.default_rng(seed)
    L, g, h, hd = cfg.n_layers, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
    if smear_tokens == 1:
        w = rng.normal(0, 2, (L, g)).astype(np.float32)
        return {"smear": w}, lambda: smear_hooks(model, w)
    kl, ql = (rng.normal(0, 2, s).astype(np.float32) for s in [(L, g, 3, hd), (L, h, 2, hd)])
    return {"key_taps": kl, "query_taps": ql}, lambda: tap_hooks(model, kl, ql)
