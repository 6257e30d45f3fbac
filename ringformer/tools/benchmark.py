"""Measurements behind docs/BENCHMARKS.md: memory, attention speed, ring balance, train steps.

Every function returns a JSON-ready dict with a `rows` list. Speed is reported as ratios taken
in the same run (this code runs on shared, noisy machines); memory comes from XLA's compiled
memory analysis, which is deterministic.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ringformer.attention import DEFAULT_KV_CHUNK, DEFAULT_Q_CHUNK, attention, chunk_sizes, tile_counts
from ringformer.config import KERNELS
from ringformer.mesh import make_mesh
from ringformer.ops import layouts


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "n_devices": jax.device_count(), "cpu": platform.processor() or platform.machine()}


def _mesh(sp: int = 1, devices: list | None = None, **axes):
    sizes = {"dp": 1, "fsdp": 1, "sp": sp, "tp": 1, **axes}
    n = int(np.prod(list(sizes.values())))
    return make_mesh(sizes, (jax.devices() if devices is None else devices)[:n])


def time_fn(fn: Callable, *args, repeats: int = 3) -> float:
    """Best wall time of `fn(*args)` after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops_per_sec(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """This machine's dense matmul rate on one device, the yardstick for attention speed."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / time_fn(f, a, repeats=repeats)


# ----------------------------------------------------------------------------- balance


def balance(*, seq_len: int = 32768, sp: int = 8, chunk: int = 512) -> dict:
    """Computed causal tiles per device per ring step for each layout.

    A ring step lasts as long as its busiest device, so the cost of a layout is the sum over
    steps of the per-step maximum; `max_over_mean` divides it by the sum of per-step means.
    """
    _check_split(seq_len, sp, chunk)
    rows = []
    for name in layouts.LAYOUTS:
        c = min(chunk, seq_len // sp // 2) if name == "zigzag" else chunk
        counts = tile_counts(name, seq_len, sp, c)
        rows.append({"layout": name,
                     "max_over_mean": round(float(counts.max(1).sum() / counts.mean(1).sum()), 4),
                     "tiles_total": int(counts.sum()),
                     "tiles_per_step": counts.tolist()})
    return {"bench": "balance", "seq_len": seq_len, "sp": sp, "chunk": chunk, "rows": rows}


# ----------------------------------------------------------------------------- attention


def causal_attention_flops(batch: int, seq: int, heads: int, head_dim: int) -> float:
    """Useful FLOPs of causal attention forward + backward, each multiply-add counted once
    as 2 FLOPs and the masked half not counted: forward 2 matmuls, backward 4 (no recompute)."""
    full_matmul = 2.0 * batch * heads * seq * seq * head_dim
    return 6 * full_matmul / 2


def _check_positive(**values: int | float | None) -> None:
    """Sizes and counts below 1 (or not finite) are bad input: they would become a traceback
    deep in JAX, or a JSON result of Infinity and NaN."""
    from ringformer.errors import ConfigError

    for name, v in values.items():
        if v is not None and not (v > 0 and np.isfinite(v)):
            raise ConfigError(f"--{name} {v} must be positive", f"pass --{name} N with N > 0")


def _available_memory() -> int:
    """Bytes this machine can still allocate: MemAvailable on Linux (free memory counts the
    page cache as used, which would refuse sizes that fit), else all physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits_in_memory(need: float, bench: str, seq: int) -> None:
    """A --seq whose arrays alone exceed this machine's memory would end in a MemoryError or
    the OOM killer after minutes; `need` is a lower bound, so a size that fits is never refused."""
    from ringformer.errors import ConfigError

    have = _available_memory()
    if need > have:
        raise ConfigError(f"--seq {seq} needs at least {need / 2**30:.1f} GiB for the {bench} "
                          f"benchmark's arrays, but this machine has {have / 2**30:.1f} GiB available",
                          "use a smaller --seq")


def _check_split(seq: int, sp: int, chunk: int | None = None) -> None:
    """A --seq the benchmark cannot split is a bad input: one error line, not a traceback."""
    from ringformer.errors import ConfigError

    _check_positive(seq=seq, sp=sp, chunk=chunk)
    if seq % (2 * sp):
        raise ConfigError(f"--seq {seq} does not split into two zigzag halves on each of {sp} devices",
                          f"use a multiple of {2 * sp}")
    # The one-device rows chunk the whole sequence, the rings each device's block or its halves;
    # no --chunk means the kernel's default query and key chunks.
    for c in (chunk,) if chunk else (DEFAULT_Q_CHUNK, DEFAULT_KV_CHUNK):
        for length in (seq, seq // sp, seq // (2 * sp)):
            if length % min(c, length):
                raise ConfigError(f"a {c}-token chunk does not divide the {length}-token blocks of "
                                  f"--seq {seq} on 1 and {sp} devices",
                                  f"use a --seq that is a multiple of {2 * sp * c}")


def attention_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
                    include_dense: bool) -> float:
    """A lower bound on the memory the attention benchmarks need: the float64 draw of the
    widest input, q, k, v and their gradients in fp32, and for the dense row the [seq, seq]
    probabilities and their gradient per head."""
    per_token = head_dim * (8 * max(heads, kv_heads) + 2 * 4 * (heads + 2 * kv_heads))
    dense = 2 * 4 * heads * float(seq) ** 2 if include_dense else 0.0
    return batch * (seq * per_token + dense)


def _random_qkv(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((batch, seq, h, head_dim)), jnp.float32)
                 for h in (heads, kv_heads, kv_heads))


def _attention_grad(mesh, impl: str, layout: str, chunks: tuple[int | None, int | None]):
    """Jitted gradient (dq, dk, dv) of sum(attention): one forward and one backward pass."""
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, mesh=mesh, impl=impl, q_chunk=chunks[0],
                                 kv_chunk=chunks[1], layout=layout))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _chunks(chunk: int | None, local: int, layout: str, n_sp: int) -> tuple[int, int]:
    """What the kernel runs with for `chunk` (None: its defaults), as reported in the rows."""
    return chunk_sizes(local, q_chunk=chunk, kv_chunk=chunk,
                       zigzag_halves=layout == "zigzag" and n_sp > 1)


def attention_speed(*, seq: int = 8192, sp: int = 8, heads: int = 8, kv_heads: int = 8,
                    head_dim: int = 64, batch: int = 1, chunk: int | None = None,
                    layout: str = "zigzag", include_dense: bool = True, repeats: int = 2) -> dict:
    """Forward+backward time of causal attention: ring over sp, blockwise and dense on one device.
    `chunk=None` runs the kernel's default chunks."""
    _check_split(seq, sp, chunk)
    _check_positive(repeats=repeats)
    _check_fits_in_memory(attention_bytes(batch, seq, heads, kv_heads, head_dim, include_dense),
                          "attention", seq)
    q, k, v = _random_qkv(batch, seq, heads, kv_heads, head_dim)
    flops = causal_attention_flops(batch, seq, heads, head_dim)
    ring = [("ring", sp, lay, _chunks(chunk, seq // sp, lay, sp)) for lay in (layout, "contiguous")]
    single = _chunks(chunk, seq, "contiguous", 1)
    cases = [*(ring if sp > 1 else []), ("blockwise", 1, "contiguous", single)]  # a ring of 1 is blockwise
    if include_dense:
        cases.append(("dense", 1, "contiguous", single))
    rows, peaks = [], []
    for impl, n, lay, c in cases:
        mesh = _mesh(sp=n)
        # The yardstick is re-measured next to every row and its best kept: on a shared machine
        # a single early measurement taken in a quiet moment (or a busy one) skews every fraction.
        peaks.append(matmul_flops_per_sec())
        t = time_fn(_attention_grad(mesh, impl, lay, c), q, k, v, repeats=repeats)
        rows.append({"impl": impl, "sp": n, "layout": lay, "q_chunk": c[0], "kv_chunk": c[1],
                     "seconds": round(t, 4),
                     "tflops": round(flops / t / 1e12, 5)})
    peak = max(*peaks, matmul_flops_per_sec())
    for r in rows:
        # Virtual CPU devices share this machine's cores, as one device's matmul does, so
        # every row is compared with the same whole-machine matmul rate.
        r["fraction_of_matmul_peak"] = round(flops / r["seconds"] / peak, 4)
    base = next(r["seconds"] for r in rows if r["impl"] == "blockwise")
    for r in rows:
        r["time_vs_blockwise"] = round(r["seconds"] / base, 3)
    return {"bench": "attention", "seq": seq, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "batch": batch, "matmul_flops_per_sec": peak,
            "attention_flops": flops, "rows": rows}


def layout_speed(*, seq: int = 8192, sp: int | None = None, heads: int = 8, head_dim: int = 64,
                 chunk: int = 512, repeats: int = 3) -> dict:
    """Forward+backward time of causal ring attention under each layout, with as many devices as
    cores: then the devices really run in parallel, a ring step lasts as long as its busiest
    device, and the balance of `balance()` shows up as time. Blockwise on one device is the
    reference (it uses every core through intra-op threads)."""
    sp = jax.device_count() if sp is None else sp
    _check_split(seq, sp, chunk)
    _check_positive(repeats=repeats)
    _check_fits_in_memory(attention_bytes(1, seq, heads, heads, head_dim, False), "layout", seq)
    q, k, v = _random_qkv(1, seq, heads, heads, head_dim)
    cases = [("blockwise", 1, "contiguous"), *(("ring", sp, lay) for lay in layouts.LAYOUTS)]
    fns = {}
    for impl, n, lay in cases:
        fns[impl, lay] = _attention_grad(_mesh(sp=n), impl, lay, (chunk, chunk))
        jax.block_until_ready(fns[impl, lay](q, k, v))
    best = {key: (float("inf"), 0.0) for key in fns}
    for _ in range(repeats):  # round-robin, so a noisy moment does not land on one layout only
        for key, fn in fns.items():
            c0, t0 = os.times(), time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            t, c1 = time.perf_counter() - t0, os.times()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            if t < best[key][0]:
                best[key] = (t, cpu / t / (os.cpu_count() or 1))
    base = best["ring", "contiguous"][0]
    rows = [{"impl": impl, "sp": n, "layout": lay, "seconds": round(best[impl, lay][0], 4),
             "time_vs_contiguous_ring": round(best[impl, lay][0] / base, 3),
             "cpu_utilization": round(best[impl, lay][1], 3)} for impl, n, lay in cases]
    return {"bench": "layout", "seq": seq, "sp": sp, "chunk": chunk, "heads": heads,
            "head_dim": head_dim, "cpu_count": os.cpu_count(), "rows": rows}


# ----------------------------------------------------------------------------- HLO overlap


def ring_hlo_report(*, seq: int = 4096, sp: int = 8, heads: int = 8, head_dim: int = 64,
                    target: str | None = None) -> dict:
    """Read the compiled HLO of ring attention's gradient: are the collective-permutes
    asynchronous (start/done pairs) and is there compute scheduled between start and done?
    `target` (e.g. "h100") compiles for that GPU without one (`hlo_overlap.gpu_devices`), in
    bf16; otherwise for this machine's devices in fp32. One row per backward schedule
    (`pipeline_grads`); the top level describes the one the model uses on these devices."""
    from ringformer.tools import hlo_overlap

    _check_split(seq, sp)
    if target is None:
        devices, dtype = jax.devices()[:sp], jnp.float32
    else:
        devices, dtype = hlo_overlap.gpu_devices(target, sp), jnp.bfloat16
    # The fused kernels are for GPUs; on CPU they would only run in Pallas's interpreter.
    kernels = ("xla",) if target is None else ("xla", "pallas")
    reports, rows = {}, []
    for kernel, pipeline in ((k, p) for k in kernels for p in (False, True)):
        r = reports[kernel, pipeline] = hlo_overlap.ring_overlap(
            devices, seq=seq, heads=heads, head_dim=head_dim, dtype=dtype,
            pipeline_grads=pipeline, kernel=kernel)
        rows.append({"kernel": kernel, "pipeline_grads": pipeline, **{k: r[k] for k in (
            "async_permute_pairs", "sync_permutes", "pairs_with_compute_between")},
            **{f"{p}_{k}": r[p][k] for p in ("forward", "backward") for k in ("permutes", "overlapped")},
            "backward_bytes": r["backward"]["bytes"]})
    auto = devices[0].platform != "cpu"  # what pipeline_grads="auto" picks on these devices
    return {"bench": "hlo", "target": target, **reports["xla", auto], "rows": rows}


# ----------------------------------------------------------------------------- model steps


@functools.cache
def _train_parts():
    # Imported lazily: balance/attention benchmarks do not need the model stack.
    from ringformer import model, optim, sharding
    from ringformer.train import loop as train
    from ringformer.train import state as train_state
    return model, optim, sharding, train, train_state


SHAPES = ("tiny", "small", "125m", "1b")


def bench_model_config(shape: str = "small"):
    """Model shapes for the step benchmarks: `tiny` is configs/tiny.py's model, `small` the
    library default (4 layers, dim 256), `125m` a GPT-2-small-sized LLaMA, all fp32; `1b` is
    configs/llama_1b_32k.py as it is (bf16, its chunks), for GPU targets."""
    from ringformer.config import default_config
    from ringformer.errors import ConfigError

    if shape not in SHAPES:
        raise ConfigError(f"unknown model shape {shape!r}", f"use --shape {', '.join(SHAPES)}")
    if shape == "1b":
        return _gpu_config()
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
    from ringformer.config import validate

    model, optim, sharding, train, train_state = _train_parts()
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh_sizes)
    config.data.seq_len, config.data.global_batch_size = seq, batch
    mesh = _mesh(devices=devices, **mesh_sizes)
    validate(config, mesh.size)  # a --seq the mesh or chunks cannot split: one error line
    cfg = model.ModelConfig.from_config(config)
    tx = optim.make_optimizer(config.optim, 100)
    step = train.make_train_step(cfg, tx, mesh)
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
        from ringformer.tools import hlo_overlap

        devices = hlo_overlap.gpu_devices(target, max(sps))
        budget_gib = budget_gib or hlo_overlap.gpu_memory_bytes(target) / 2**30
    _check_positive(budget_gib=budget_gib)
    base = bench_model_config(shape)
    budget = int(budget_gib * 2**30)
    rows = []
    from tqdm import tqdm

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

    return time_fn(run, repeats=repeats)


def step_bytes(model_cfg, seq: int, batch: int = 1) -> float:
    """A lower bound on the memory of one training step: parameters, gradients and Adam's two
    moments in fp32; the input of every layer, kept for the backward pass (remat full); one
    layer's working set of about a dozen [seq, dim] arrays (q, k, v, output, residuals and
    their gradients); the batch on the host (int64/float64) and on the device."""
    from ringformer.train import metrics

    act = jnp.dtype(model_cfg.dtype).itemsize
    per_token = act * model_cfg.dim * (model_cfg.n_layers + 12) + 5 * (8 + 4)
    return 16.0 * metrics.matmul_params(model_cfg) + batch * seq * per_token


def step_speed(*, shape: str = "tiny", seq: int = 8192, sp: int = 8, repeats: int = 3) -> dict:
    """Training tokens/s and MFU for blockwise on one device vs the ring over `sp` devices,
    at equal total tokens per step."""
    from ringformer.train import metrics

    _check_positive(seq=seq, sp=sp, repeats=repeats)
    base = bench_model_config(shape)
    _check_fits_in_memory(step_bytes(base.model, seq), "step", seq)
    rows, peaks = [], []
    for impl, n in (("blockwise", 1), ("ring", sp)):
        c = base.copy_and_resolve_references()
        c.attention.impl = impl
        peaks.append(matmul_flops_per_sec())  # best of several, as in attention_speed
        t = time_train_step(c, {"sp": n}, seq, repeats=repeats)
        rows.append({"impl": impl, "sp": n, "seconds_per_step": round(t, 4),
                     "tokens_per_sec": round(seq / t, 1)})
    peak = max(*peaks, matmul_flops_per_sec())
    flops_per_token = metrics.flops_per_token(base.model, seq)
    for r in rows:
        r["mfu"] = round(metrics.mfu(r["tokens_per_sec"], flops_per_token, 1, peak), 4)
    rows[1]["ring_overhead"] = round(rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"] - 1, 4)
    return {"bench": "step", "model": shape, "seq": seq, "matmul_flops_per_sec": peak,
            "mfu_note": "virtual CPU devices share the machine's cores: MFU is against the "
                        "whole machine's measured fp32 matmul rate", "rows": rows}


# Dense bf16 peaks per device kind (vendor datasheets), for MFU on accelerators.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
             "TPU v5p": 459e12}


def _gpu_config():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "llama_1b_32k.py"
    spec = importlib.util.spec_from_file_location("llama_1b_32k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def gpu_mfu(*, seq: int = 32768, repeats: int = 3, sp: int = 1) -> dict:
    """MFU of the ~1B LLaMA in configs/llama_1b_32k.py at `seq` tokens in bf16 on GPU."""
    from ringformer.train import metrics

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        from ringformer.errors import UserError
        raise UserError(f"the gpu benchmark needs a GPU, this machine has {dev.platform}",
                        "run it on a machine with an NVIDIA GPU, or add --target h100 to compile only")
    c = _gpu_config()
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), c.train.peak_flops)
    rows = []
    for kernel in KERNELS:  # the XLA tile sweeps, then the fused Pallas kernels
        c.attention.kernel = kernel
        try:
            t = time_train_step(c, {"sp": sp}, seq, repeats=repeats)
        except Exception as e:  # a first run on a new card must still report the other row
            rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq,
                         "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        tps = seq / t
        rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq,
                     "seconds_per_step": round(t, 4), "tokens_per_sec": round(tps, 1),
                     "mfu": round(metrics.mfu(tps, metrics.flops_per_token(c.model, seq), sp, peak), 4)})
    return {"bench": "gpu", "device_kind": dev.device_kind, "seq": seq, "sp": sp,
            "params_matmul": metrics.matmul_params(c.model), "peak_flops": peak, "rows": rows}


def gpu_compile(*, target: str, seq: int = 32768, sp: int = 1) -> dict:
    """The `gpu` benchmark's training step compiled for `sp` GPUs of `target` without them: does
    it compile, and does it fit the card's memory? Nothing runs, so there is no MFU."""
    from ringformer.tools import hlo_overlap

    devices = hlo_overlap.gpu_devices(target, sp)
    card = hlo_overlap.gpu_memory_bytes(target)
    rows = []
    for kernel in KERNELS:
        c = _gpu_config()
        c.attention.kernel = kernel
        total = step_memory(c, {"sp": sp}, seq, devices=devices)
        rows.append({"model": "llama_1b_32k", "kernel": kernel, "seq": seq, "sp": sp,
                     "step_gib_per_device": round(total / 2**30, 2),
                     "card_gib": round(card / 2**30, 2), "fits": total <= card})
    return {"bench": "gpu", "target": target, "compile_only": True,
            "device_kind": devices[0].device_kind, "seq": seq, "sp": sp, "rows": rows}
