"""Attention measurements behind docs/BENCHMARKS.md: speed, ring balance, layouts, HLO overlap.

Also the helpers every benchmark shares (timing, the mesh, checks of the sizes asked for);
training-step memory and speed are in bench_step.py, the GPU runs in bench_gpu.py.
Every function returns a JSON-ready dict with a `rows` list. Speed is reported as ratios taken
in the same run (this code runs on shared, noisy machines); memory comes from XLA's compiled
memory analysis, which is deterministic.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ringformer.attention import DEFAULT_KV_CHUNK, DEFAULT_Q_CHUNK, attention, chunk_sizes, tile_counts
from ringformer.errors import ConfigError
from ringformer.mesh import make_mesh
from ringformer.ops import layouts
from ringformer.tools import hlo_overlap


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "n_devices": jax.device_count(), "cpu": platform.processor() or platform.machine()}


def bench_mesh(sp: int = 1, devices: list | None = None, **axes):
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
    check_split(seq_len, sp, chunk)
    # The permuted token indices, and one [chunks, chunks] comparison per (step, device).
    tiles = seq_len // sp // min(chunk, seq_len // sp)
    check_fits_in_memory(3 * 8 * seq_len + 2 * tiles * tiles, "balance", seq_len)
    rows = []
    for name in layouts.LAYOUTS:
        c = min(chunk, layouts.chunk_cap(name, seq_len // sp, sp))
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


def check_positive(**values: int | float | None) -> None:
    """Sizes and counts below 1 (or not finite) are bad input: they would become a traceback
    deep in JAX, or a JSON result of Infinity and NaN."""
    for name, v in values.items():
        if v is not None and not (v > 0 and np.isfinite(v)):
            raise ConfigError(f"--{name} {v} must be positive", f"pass --{name} N with N > 0")


def available_memory() -> int:
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


def check_fits_in_memory(need: float, bench: str, seq: int, *, sizes: str = "") -> None:
    """A --seq whose arrays alone exceed this machine's memory would end in a MemoryError or
    the OOM killer after minutes; `need` is a lower bound, so a size that fits is never refused.
    `sizes` names the flags when they are not --seq (e.g. generate's --lengths x --batches)."""
    have = available_memory()
    if need > have:
        sizes = sizes or f"--seq {seq}"
        raise ConfigError(f"{sizes} needs at least {need / 2**30:.1f} GiB for the {bench} "
                          f"benchmark's arrays, but this machine has {have / 2**30:.1f} GiB available",
                          f"use a smaller {sizes.split()[0]}")


def check_split(seq: int, sp: int, chunk: int | None = None) -> None:
    """A --seq the benchmark cannot split is a bad input: one error line, not a traceback."""
    check_positive(seq=seq, sp=sp, chunk=chunk)
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
    return chunk_sizes(local, q_chunk=chunk, kv_chunk=chunk, layout=layout, n_sp=n_sp)


def attention_speed(*, seq: int = 8192, sp: int = 8, heads: int = 8, kv_heads: int = 8,
                    head_dim: int = 64, batch: int = 1, chunk: int | None = None,
                    layout: str = "zigzag", include_dense: bool = True, repeats: int = 2) -> dict:
    """Forward+backward time of causal attention: ring over sp, blockwise and dense on one device.
    `chunk=None` runs the kernel's default chunks."""
    check_split(seq, sp, chunk)
    check_positive(repeats=repeats)
    check_fits_in_memory(attention_bytes(batch, seq, heads, kv_heads, head_dim, include_dense),
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
        mesh = bench_mesh(sp=n)
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
    check_split(seq, sp, chunk)
    check_positive(repeats=repeats)
    check_fits_in_memory(attention_bytes(1, seq, heads, heads, head_dim, False), "layout", seq)
    q, k, v = _random_qkv(1, seq, heads, heads, head_dim)
    cases = [("blockwise", 1, "contiguous"), *(("ring", sp, lay) for lay in layouts.LAYOUTS)]
    fns = {}
    for impl, n, lay in cases:
        fns[impl, lay] = _attention_grad(bench_mesh(sp=n), impl, lay, (chunk, chunk))
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
    check_split(seq, sp)
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
