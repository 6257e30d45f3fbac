"""Training-step measurements behind docs/BENCHMARKS.md: memory per device, the longest
context that fits a budget, and tokens/s with MFU.

Memory comes from XLA's compiled memory analysis (deterministic, and it works on compile-only
GPU devices); speed is timed on synthetic tokens, one document per row.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ringformer import model, optim, sharding
from ringformer.config import config_module, default_config, validate
from ringformer.errors import ConfigError
from ringformer.tools import benchmark, hlo_overlap
from ringformer.train import loop, metrics
from ringformer.train import state as train_state

SHAPES = ("tiny", "small", "125m", "1b")


def bench_model_config(shape: str = "small"):
    """Model shapes for the step benchmarks: `tiny` is configs/tiny.py's model, `small` the
    library default (4 layers, dim 256), `125m` a GPT-2-small-sized LLaMA, all fp32; `1b` is
    configs/llama_1b_32k.py as it is (bf16, its chunks), for GPU targets."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown model shape {shape!r}", f"use --shape {', '.join(SHAPES)}")
    if shape == "1b":
        return llama_1b_config()
    c = default_config()
    c.model.dtype = "float32"
    c.model.remat = "full"
    if shape == "tiny":
        c.model.update(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)
    elif shape == "125m":
        c.model.update(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                       vocab_size=32000)
    return c


def _step_parts(config, mesh_sizes: dict, seq: int, batch: int, devices: list | None = None):
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh_sizes)
    config.data.seq_len, config.data.global_batch_size = seq, batch
    mesh = benchmark.bench_mesh(devices=devices, **mesh_sizes)
    validate(config, mesh.size)  # a --seq the mesh or chunks cannot split: one error line
    cfg = model.ModelConfig.from_config(config)
    tx = optim.make_optimizer(config.optim, 100)
    step = loop.make_train_step(cfg, tx, mesh)
    bsh = sharding.batch_sharding(mesh)
    names = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
    dtypes = (jnp.int32,) * 4 + (jnp.float32,)
    abstract_batch = {n: jax.ShapeDtypeStruct((batch, seq), d, sharding=bsh)
                      for n, d in zip(names, dtypes, strict=True)}
    return train_state, mesh, cfg, tx, step, abstract_batch


def step_memory(config, mesh_sizes: dict, seq: int, batch: int = 1,
                devices: list | None = None) -> int:
    """Per-device bytes (arguments + temporaries) of one compiled training step; `devices` may
    be compile-only ones (`hlo_overlap.gpu_devices`)."""
    train_state, mesh, cfg, tx, step, abstract_batch = _step_parts(config, mesh_sizes, seq, batch,
                                                             devices)
    state = jax.eval_shape(lambda: train_state.init_state(cfg, tx, mesh, 0))
    shardings = train_state.state_shardings(cfg, tx, mesh, state.params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    compiled = jax.jit(step, donate_argnums=0).lower(state, abstract_batch).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes)


def max_context(config, mesh_sizes: dict, *, budget: int, lo: int, hi: int, unit: int,
                devices: list | None = None) -> int:
    """Longest context (a multiple of `unit`) whose training step fits `budget` bytes per device."""
    def fits(seq: int) -> bool:
        return step_memory(config, mesh_sizes, seq, devices=devices) <= budget

    if not fits(lo):
        return 0
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def memory(*, budget_gib: float | None = 2.0, shape: str = "small", sps=(2, 4, 8),
           target: str | None = None) -> dict:
    """Max trainable context per device budget: dense and blockwise on one device, ring on n.
    With a GPU `target` the steps are compiled for its cards (nothing runs) and the budget
    defaults to the card's memory."""
    devices = None
    if target is not None:
        devices = hlo_overlap.gpu_devices(target, max(sps))
        budget_gib = budget_gib or hlo_overlap.gpu_memory_bytes(target) / 2**30
    benchmark.check_positive(budget_gib=budget_gib)
    base = bench_model_config(shape)
    budget = int(budget_gib * 2**30)
    rows = []
    cases = [("dense", 1), ("blockwise", 1), *(("ring", n) for n in sps)]
    for impl, sp in tqdm(cases, desc="memory bisection", unit="config"):
        c = base.copy_and_resolve_references()
        c.attention.impl = impl
        # Each zigzag half of a device's block must hold whole attention chunks.
        chunk = 2 * max(c.attention.q_chunk, c.attention.kv_chunk)
        unit = max(chunk, c.model.mlp_chunk, c.model.loss_chunk) * sp
        ctx = max_context(c, {"sp": sp}, budget=budget, lo=unit, hi=unit * 8, unit=unit,
                          devices=devices)
        rows.append({"impl": impl, "sp": sp, "max_context": ctx})
    single = next(r["max_context"] for r in rows if r["impl"] == "blockwise")
    for r in rows:
        r["vs_blockwise"] = round(r["max_context"] / single, 3) if single else None
    return {"bench": "memory", "budget_bytes": budget, "model": shape, "target": target,
            "rows": rows}


def time_train_step(config, mesh_sizes: dict, seq: int, batch: int = 1, *,
                    repeats: int = 3) -> float:
    """Best seconds per training step on synthetic tokens (one document per row)."""
    train_state, mesh, cfg, tx, step, abstract_batch = _step_parts(config, mesh_sizes, seq, batch)
    state = train_state.init_state(cfg, tx, mesh, 0)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    host = {"tokens": tok[:, :-1], "targets": tok[:, 1:],
            "segment_ids": np.ones((batch, seq)), "positions": np.tile(np.arange(seq), (batch, 1)),
            "loss_mask": np.ones((batch, seq))}
    data = {k: jax.device_put(np.asarray(v, abstract_batch[k].dtype), abstract_batch[k].sharding)
            for k, v in host.items()}
    fn = jax.jit(step, donate_argnums=0)
    holder = [state]

    def run():
        holder[0], m = fn(holder[0], data)
        return m["loss"]

    return benchmark.time_fn(run, repeats=repeats)


def step_bytes(model_cfg, seq: int, batch: int = 1) -> float:
    """A lower bound on the memory of one training step: parameters, gradients and Adam's two
    moments in fp32; the input of every layer, kept for the backward pass (remat full); one
    layer's working set of about a dozen [seq, dim] arrays (q, k, v, output, residuals and
    their gradients); the batch on the host (int64/float64) and on the device."""
    act = jnp.dtype(model_cfg.dtype).itemsize
    per_token = act * model_cfg.dim * (model_cfg.n_layers + 12) + 5 * (8 + 4)
    return 16.0 * metrics.matmul_params(model_cfg) + batch * seq * per_token


def step_speed(*, shape: str = "tiny", seq: int = 8192, sp: int = 8, repeats: int = 3) -> dict:
    """Training tokens/s and MFU for blockwise on one device vs the ring over `sp` devices,
    at equal total tokens per step."""
    benchmark.check_positive(seq=seq, sp=sp, repeats=repeats)
    base = bench_model_config(shape)
    benchmark.check_fits_in_memory(step_bytes(base.model, seq), "step", seq)
    rows, peaks = [], []
    for impl, n in (("blockwise", 1), ("ring", sp)):
        c = base.copy_and_resolve_references()
        c.attention.impl = impl
        peaks.append(benchmark.matmul_flops_per_sec())  # best of several, as in attention_speed
        t = time_train_step(c, {"sp": n}, seq, repeats=repeats)
        rows.append({"impl": impl, "sp": n, "seconds_per_step": round(t, 4),
                     "tokens_per_sec": round(seq / t, 1)})
    peak = max(*peaks, benchmark.matmul_flops_per_sec())
    flops_per_token = metrics.flops_per_token(base.model, seq)
    for r in rows:
        r["mfu"] = round(metrics.mfu(r["tokens_per_sec"], flops_per_token, 1, peak), 4)
    rows[1]["ring_overhead"] = round(rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"] - 1, 4)
    # The whole training loop (configs/tiny.py): real data loading against pre-placed batches.
    from ringformer.tools import bench_loop
    trainer = bench_loop.loop_data_vs_prefed()
    return {"bench": "step", "model": shape, "seq": seq, "matmul_flops_per_sec": peak,
            "mfu_note": "virtual CPU devices share the machine's cores: MFU is against the "
                        "whole machine's measured fp32 matmul rate", "rows": rows,
            "data_vs_prefed": trainer["data_vs_prefed"], "loop": trainer}


def llama_1b_config():
    """configs/llama_1b_32k.py's config: the model the GPU benchmarks train."""
    path = Path(__file__).resolve().parents[2] / "configs" / "llama_1b_32k.py"
    return config_module(path).get_config()
