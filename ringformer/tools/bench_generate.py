"""`bench.py generate`: prefill and decode speed against transformers, and the longest prompt
that prefills within a memory budget per device.

One ~100M-parameter LLaMA shape (random weights, fp32) for both sides. ringformer runs the
Python API (`Generator`, all devices on sp, compile excluded); transformers runs
`LlamaForCausalLM.generate` (torch CPU, greedy, all threads). Prefill speed is prompt tokens
per second of the first forward; decode speed is generated tokens per second after it
(transformers': the time of N new tokens less that of one, over N - 1). torch is imported
only here, only for the comparison. The JSON records ringformer's mesh and how many
(virtual) devices the process had (`bench.py generate --devices N` makes exactly N).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np

from ringformer import model
from ringformer.errors import ConfigError
from ringformer.generate import api, decode
from ringformer.generate import cache as kv_cache
from ringformer.mesh import make_mesh
from ringformer.tools import benchmark

SHAPE = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
             tie_embeddings=True, dtype="float32")
NEW_TOKENS = 16


def bench_config() -> model.ModelConfig:
    return model.ModelConfig(**SHAPE).with_attention(layout="zigzag", q_chunk=512, kv_chunk=512)


def n_params(cfg: model.ModelConfig) -> int:
    shapes = jax.tree.leaves(model.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return int(sum(np.prod(s) for s in shapes))


def _mesh(sp: int):
    return make_mesh({"dp": 1, "fsdp": 1, "sp": sp, "tp": 1}, devices=jax.devices()[:sp])


def ringformer_speed(gen: api.Generator, prompts: list[list[int]], new_tokens: int) -> dict:
    gen.generate(prompts, max_new_tokens=new_tokens)  # compiles
    r = gen.generate(prompts, max_new_tokens=new_tokens)
    return {"prefill_tokens_per_sec": r.prefill_tokens / r.prefill_seconds,
            "decode_tokens_per_sec": r.decode_tokens / r.decode_seconds}


def transformers_speed(cfg: model.ModelConfig, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ringformer.hf.mapping import config_to_hf

    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg))).eval()
    ids = torch.as_tensor(np.asarray(prompts, np.int64))

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t

    run(2)  # warm-up
    one, full = run(1), run(new_tokens)
    return {"prefill_tokens_per_sec": ids.numel() / one,
            "decode_tokens_per_sec": ids.shape[0] * (new_tokens - 1) / max(full - one, 1e-9)}


def prefill_bytes(cfg: model.ModelConfig, mesh, length: int) -> int:
    """Per-device bytes (arguments + temporaries + outputs: the cache) of one compiled prefill
    of a `length`-token prompt, batch 1."""
    sp = mesh.shape["sp"]
    run_cfg, s = api.prefill_config(cfg, length, sp)
    spec = kv_cache.make_spec(s, 1, sp, decode.attention_options(run_cfg)["layout"])
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    shard = decode.decode_shardings(cfg, params, mesh)
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          params, shard)
    inputs = decode.prefill_inputs(np.zeros((1, s), np.int32), np.array([length]), spec, mesh)
    m = decode.prefill_jit.lower(run_cfg, spec, mesh, params, *inputs).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)


def longest_prompt(cfg: model.ModelConfig, sp: int, budget: int, unit: int = 1024) -> int:
    """Longest prompt (a multiple of `unit`) whose prefill fits `budget` bytes per device."""
    mesh = _mesh(sp)
    fits = lambda n: prefill_bytes(cfg, mesh, n) <= budget
    lo, hi = unit, unit * 8
    if not fits(lo):
        return 0
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_fits(cfg: model.ModelConfig, length: int, batch: int, new_tokens: int) -> None:
    """Refuse prompts whose token lists and KV cache alone exceed this machine's memory, before
    the parameters are built (a lower bound: Python ints of the prompts, the float32 cache)."""
    benchmark.check_positive(lengths=length, batches=batch)
    tokens = batch * (length + new_tokens)
    cache = 2 * cfg.n_layers * tokens * cfg.n_kv_heads * cfg.head_dim * 4
    benchmark.check_fits_in_memory(36 * batch * length + cache, "generate", length,
                                   sizes=f"--lengths {length} x --batches {batch}")


def generate_bench(*, lengths: Sequence[int] = (1024, 4096, 16384), batches: Sequence[int] = (1, 8),
                   sp: int = 8, new_tokens: int = NEW_TOKENS, budget_gib: float = 2.0,
                   memory: bool = True, compare: bool = True) -> dict:
    """The table of docs/BENCHMARKS.md (generate): speeds per (length, batch), then memory."""
    benchmark.check_positive(sp=sp, new_tokens=new_tokens, budget_gib=budget_gib)
    if sp > jax.device_count():
        raise ConfigError(f"sp {sp} needs {sp} devices; this process has {jax.device_count()}",
                          f"pass --devices {sp}, or a smaller --sp")
    cfg = bench_config()
    check_fits(cfg, max(lengths), max(batches), new_tokens)
    params = model.init_params(cfg, jax.random.key(0))
    gen = api.Generator(cfg, params, mesh=_mesh(sp))
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        for batch in batches:
            prompts = rng.integers(3, cfg.vocab_size, (batch, length)).tolist()
            row = {"prompt_tokens": length, "batch": batch,
                   "ringformer": ringformer_speed(gen, prompts, new_tokens)}
            if compare:
                row["transformers"] = transformers_speed(cfg, prompts, new_tokens)
            rows.append(row)
    out = {"bench": "generate", "params": n_params(cfg), "shape": SHAPE, "sp": sp,
           "mesh": dict(gen.mesh.shape), "devices": jax.device_count(),
           "new_tokens": new_tokens, "rows": rows}
    if memory:
        budget = int(budget_gib * 2 ** 30)
        rings = (1, min(8, jax.device_count()))  # sp = 8 where this process has 8 devices
        out["longest_prompt"] = {f"sp={n}": longest_prompt(cfg, n, budget) for n in sorted(set(rings))}
        out["budget_gib"] = budget_gib
    return out
