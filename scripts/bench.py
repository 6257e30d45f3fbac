"""Benchmarks behind docs/BENCHMARKS.md; `--json` prints one JSON object as the last line.

    python scripts/bench.py memory [--budget_gib 2] [--shape small] --json
    python scripts/bench.py memory --target h100 --json   # the 1B model on H100s, compile only
    python scripts/bench.py attention [--seq 8192] [--sp 8] --json
    python scripts/bench.py balance [--seq 32768] [--sp 8] --json
    python scripts/bench.py layout [--seq 8192] [--sp <cores>] --json   # one device per core
    python scripts/bench.py step [--shape tiny] [--seq 8192] [--sp 8] --json
    python scripts/bench.py generate [--lengths 1024,4096,16384 --batches 1,8] --json
    python scripts/bench.py generate --devices $(nproc) --no_memory --json   # one device per core
    python scripts/bench.py hlo --json            # are the ring's permutes asynchronous?
    python scripts/bench.py hlo --target h100 --json   # ... on 8 H100s, compiled without them
    python scripts/bench.py gpu [--seq 32768] --json   # on a machine with an NVIDIA GPU
    python scripts/bench.py gpu --target h100 [--sp 8 --seq 262144] --json   # compile only
    python scripts/bench.py data [--sizes 1,4] --json   # tokenized cache and data pipeline
"""

import json
import math
import os
import sys
from argparse import ArgumentTypeError, RawTextHelpFormatter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringformer.errors import ConfigError
from ringformer.launch.flags import ArgumentParser, ensure_cpu_devices, run_main


def positive(kind: type):
    """argparse type: a number > 0. Zero must not fall back to a default (`a.sp or 8`) and a
    negative size must not reach JAX, where it ends as a traceback."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ArgumentTypeError(f"must be positive, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__, formatter_class=RawTextHelpFormatter)
    p.add_argument("bench", choices=["memory", "attention", "balance", "layout", "step", "hlo", "gpu",
                                     "data", "generate"])
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--seq", type=positive(int), default=None, help="sequence length")
    p.add_argument("--sp", type=positive(int), default=None,
                   help="ring size (default 8; for layout, the number of CPU cores)")
    p.add_argument("--shape", default=None, help="model shape: tiny, small, 125m or 1b")
    p.add_argument("--budget_gib", type=positive(float), default=None,
                   help="memory budget per device (default 2; with --target, the card's memory)")
    p.add_argument("--chunk", type=positive(int), default=None,
                   help="attention chunk (default: 512; attention: the kernel's, 1024 x 512)")
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--sizes", default="1,4",
                   help="data: synthetic corpus sizes in GB, comma-separated (default 1,4)")
    p.add_argument("--target", default=None,
                   help="memory, hlo, gpu: compile for this GPU (ringformer/gpu_targets) instead of"
                        " running here; needs jax-cuda12-plugin, not a GPU")
    p.add_argument("--lengths", default="1024,4096,16384",
                   help="generate: prompt lengths, comma-separated (default 1024,4096,16384)")
    p.add_argument("--batches", default="1,8", help="generate: batch sizes (default 1,8)")
    p.add_argument("--no_memory", action="store_true", help="generate: skip the longest prompt")
    p.add_argument("--devices", type=positive(int), default=None,
                   help="generate: make exactly this many virtual CPU devices and run ringformer"
                        " on sp = all of them\n(default: 8 devices, sp 8; --devices $(nproc): one"
                        " per core, no devices sharing a core)")
    a = p.parse_args(argv)
    if a.bench == "data":
        try:
            a.sizes = parse_sizes(a.sizes)
        except ArgumentTypeError as e:
            p.error(f"--sizes: {e}")
    if a.target and a.bench not in ("memory", "hlo", "gpu"):
        p.error(f"--target applies to memory, hlo and gpu, not {a.bench}")
    if a.devices and a.bench != "generate":
        p.error(f"--devices applies to generate, not {a.bench}")
    if a.devices and a.sp and a.sp > a.devices:
        p.error(f"--sp {a.sp} needs at least {a.sp} devices, not --devices {a.devices}")
    return a


def parse_sizes(text: str) -> tuple[float, ...]:
    """`--sizes 0.1,1`: positive GB values."""
    sizes = tuple(positive(float)(t) for t in text.split(",") if t.strip())
    if not sizes:
        raise ArgumentTypeError(f"--sizes {text!r} names no size")
    return sizes


def measure(a, sp_given: int | None) -> dict:
    """The benchmark `a.bench` asks for, with the devices already made."""
    from ringformer.tools import bench_gpu, bench_step
    from ringformer.tools import benchmark as b

    kw = {"seq": a.seq} if a.seq else {}
    if a.bench == "data":
        from ringformer.tools import bench_data

        return bench_data.data_bench(sizes=a.sizes)
    if a.bench == "generate":
        from ringformer.tools import bench_generate

        try:
            lengths, batches = ([positive(int)(t) for t in x.split(",")] for x in (a.lengths, a.batches))
        except ArgumentTypeError as e:
            raise ConfigError(f"--lengths/--batches: {e}", "pass e.g. --lengths 1024,4096") from None
        return bench_generate.generate_bench(lengths=lengths, batches=batches, sp=a.sp,
                                             budget_gib=a.budget_gib or 2.0, memory=not a.no_memory)
    if a.bench == "memory":
        return bench_step.memory(budget_gib=a.budget_gib or (None if a.target else 2.0),
                                 shape=a.shape or ("1b" if a.target else "small"), target=a.target)
    if a.bench == "attention":
        return b.attention_speed(sp=a.sp, chunk=a.chunk, repeats=a.repeats, **kw)
    if a.bench == "balance":
        return b.balance(sp=a.sp, chunk=a.chunk or 512, **({"seq_len": a.seq} if a.seq else {}))
    if a.bench == "layout":
        return b.layout_speed(sp=a.sp, chunk=a.chunk or 512, repeats=a.repeats, **kw)
    if a.bench == "step":
        return bench_step.step_speed(shape=a.shape or "tiny", sp=a.sp, repeats=a.repeats, **kw)
    if a.bench == "hlo":
        return b.ring_hlo_report(sp=a.sp, target=a.target, **kw)
    if a.target:
        return bench_gpu.gpu_compile(target=a.target, sp=sp_given or 1, **kw)
    return bench_gpu.gpu_mfu(repeats=a.repeats, **kw)


def main() -> None:
    a = parse_args()
    sp_given = a.sp
    if a.target:
        # The CUDA plugin only describes the target; this host compiles on its CPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if a.devices:
        # generate on a mesh of exactly these devices (e.g. one per core: a CPU host's virtual
        # devices share its cores, so 8 on 2 cores pay per-device dispatch and collectives).
        ensure_cpu_devices(a.devices, exactly=True)
        a.sp = a.sp or a.devices
    elif a.bench == "layout":
        # One virtual device per core, so the ring's devices compute in parallel for real.
        a.sp = a.sp or max(2, os.cpu_count() or 1)
        ensure_cpu_devices(a.sp)
    else:
        a.sp = a.sp or 8
        # attention gets exactly sp devices: XLA's CPU runtime runs a one-device program ~30%
        # slower in a process that also holds idle virtual devices, so `--sp 1` measures the
        # kernel alone.
        ensure_cpu_devices(a.sp if a.bench == "attention" else max(8, a.sp))

    from ringformer.tools.benchmark import machine

    out = measure(a, sp_given)
    out["machine"] = machine()
    out["command"] = "python scripts/bench.py " + " ".join(sys.argv[1:])
    if not a.json:
        for row in out.get("rows", []):
            print("  ".join(f"{k}={v}" for k, v in row.items() if k != "tiles_per_step"))
    print(json.dumps(out))

if __name__ == "__main__":
    run_main(main)
