"""The benchmark suite's JSON schema, on sizes small enough for a test (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringformer.tools import bench_step, benchmark

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_balance_json_schema_and_goal():
    out = run_bench("balance", "--seq", "4096", "--sp", "8", "--chunk", "64")
    assert out["bench"] == "balance" and out["machine"]["n_devices"] >= 8
    ratio = {r["layout"]: r["max_over_mean"] for r in out["rows"]}
    assert set(ratio) == {"contiguous", "striped", "zigzag"}
    assert ratio["striped"] <= 1.05 and ratio["zigzag"] <= 1.05 < ratio["contiguous"]


def test_layout_json_schema():
    out = run_bench("layout", "--seq", "512", "--sp", "2", "--chunk", "64", "--repeats", "1")
    assert out["bench"] == "layout" and out["sp"] == 2
    assert [(r["impl"], r["layout"]) for r in out["rows"]] == [
        ("blockwise", "contiguous"), ("ring", "contiguous"), ("ring", "striped"), ("ring", "zigzag")]
    assert all(r["seconds"] > 0 and r["cpu_utilization"] > 0 for r in out["rows"])
    assert out["rows"][1]["time_vs_contiguous_ring"] == 1.0


def test_attention_rows():
    out = benchmark.attention_speed(seq=256, sp=4, heads=2, kv_heads=1, head_dim=16, chunk=32,
                                    repeats=1)
    impls = [(r["impl"], r["sp"], r["layout"]) for r in out["rows"]]
    assert impls == [("ring", 4, "zigzag"), ("ring", 4, "contiguous"), ("blockwise", 1, "contiguous"),
                     ("dense", 1, "contiguous")]
    for r in out["rows"]:
        assert r["seconds"] > 0 and r["fraction_of_matmul_peak"] > 0
    assert out["attention_flops"] == benchmark.causal_attention_flops(1, 256, 2, 16)
    single = benchmark.attention_speed(seq=256, sp=1, heads=2, kv_heads=1, head_dim=16, chunk=32,
                                       repeats=1, include_dense=False)
    assert [r["impl"] for r in single["rows"]] == ["blockwise"]  # a ring of one is blockwise


def test_memory_bisection_finds_the_boundary():
    c = bench_step.bench_model_config("tiny")
    c.attention.impl = "blockwise"
    small = bench_step.step_memory(c, {"sp": 1}, 512)
    budget = bench_step.step_memory(c, {"sp": 1}, 2048)
    found = bench_step.max_context(c, {"sp": 1}, budget=budget, lo=512, hi=1024, unit=512)
    assert small < budget and found >= 2048
    assert bench_step.step_memory(c, {"sp": 1}, found + 512) > budget


def test_step_rows():
    out = bench_step.step_speed(shape="tiny", seq=512, sp=4, repeats=1)
    assert [(r["impl"], r["sp"]) for r in out["rows"]] == [("blockwise", 1), ("ring", 4)]
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] > 0 for r in out["rows"])
    assert "ring_overhead" in out["rows"][1]


def test_hlo_report_counts_permutes():
    out = benchmark.ring_hlo_report(seq=512, sp=4, heads=2, head_dim=16)
    assert out["async_permute_pairs"] + out["sync_permutes"] > 0
    assert [r["pipeline_grads"] for r in out["rows"]] == [False, True]
    for r in out["rows"]:
        assert r["forward_permutes"] > 0 and r["backward_permutes"] > 0
        assert 0 <= r["backward_overlapped"] <= r["backward_permutes"]


def test_gpu_bench_refuses_cleanly_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "gpu", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2 and proc.stderr.startswith("error: the gpu benchmark needs a GPU")


def test_bad_arguments_give_one_error_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "nope"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument bench: invalid choice")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["attention", "--target", "h100"], "error: --target applies to memory, hlo and gpu, not attention"),
    (["gpu", "--target", "tpu9"], "error: unknown GPU target 'tpu9' (use one of h100)"),
    (["hlo", "--sp", "3"], "error: --seq 4096 does not split into two zigzag halves on each of 3"),
    (["attention", "--seq", "1000", "--sp", "2"], "error: a 512-token chunk does not divide the 1000"),
    (["step", "--seq", "1000"], "error: attention.q_chunk=256 does not divide the 1000 tokens"),
    (["memory", "--shape", "huge"], "error: unknown model shape 'huge' (use --shape tiny, small, 125m, 1b)"),
    (["step", "--shape", "huge", "--seq", "64"], "error: unknown model shape 'huge' (use --shape tiny,"),
    (["attention", "--seq", "64", "--sp", "2", "--chunk", "0"],
     "error: argument --chunk: must be positive, not 0"),
    (["attention", "--seq", "64", "--sp", "2", "--chunk", "-8"], "error: argument --chunk: must be positive"),
    (["balance", "--sp", "-2"], "error: argument --sp: must be positive, not -2"),
    (["layout", "--devices", "2"], "error: --devices applies to generate, not layout"),
    (["generate", "--devices", "2", "--sp", "4"],
     "error: --sp 4 needs at least 4 devices, not --devices 2"),
    (["attention", "--seq", "64", "--sp", "2", "--repeats", "0", "--json"],
     "error: argument --repeats: must be positive, not 0"),
    (["attention", "--seq", "0"], "error: argument --seq: must be positive, not 0"),
    (["balance", "--sp", "0"], "error: argument --sp: must be positive, not 0"),
    (["memory", "--budget_gib", "0"], "error: argument --budget_gib: must be positive, not 0"),
    (["memory", "--budget_gib", "-1"], "error: argument --budget_gib: must be positive, not -1"),
    # Sizes no machine holds: refused before any array is allocated.
    (["attention", "--seq", "8388608", "--sp", "8"], "error: --seq 8388608 needs at least"),
    (["step", "--seq", str(2**36)], f"error: --seq {2**36} needs at least"),
])
def test_bad_targets_and_sizes_give_one_error_line(args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_generate_devices_replaces_the_device_count():
    """`bench.py generate --devices N` makes exactly N devices, even where XLA_FLAGS already
    asks for 8 (as the test suite does), so one device per core is really one per core."""
    code = ("from ringformer.launch.flags import ensure_cpu_devices; "
            "ensure_cpu_devices(2, exactly=True); import jax; print(jax.device_count())")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "2"


def test_1b_shape_reads_the_repository_config():
    """The GPU benchmarks' model comes from configs/llama_1b_32k.py, found from the package."""
    c = bench_step.bench_model_config("1b")
    assert c.model.dim == bench_step.llama_1b_config().model.dim and c.model.dtype == "bfloat16"


def test_bad_sizes_are_refused_in_process(monkeypatch):
    """The library functions refuse what the script's argument types refuse, and sizes beyond
    the memory this machine has, before they allocate anything."""
    from ringformer.errors import ConfigError

    with pytest.raises(ConfigError, match="--chunk 0 must be positive"):
        benchmark.attention_speed(seq=64, sp=2, chunk=0)
    with pytest.raises(ConfigError, match="--repeats 0 must be positive"):
        benchmark.attention_speed(seq=64, sp=2, chunk=16, repeats=0)
    with pytest.raises(ConfigError, match="--sp -2 must be positive"):
        benchmark.balance(seq_len=64, sp=-2)
    with pytest.raises(ConfigError, match="--budget_gib 0 must be positive"):
        bench_step.memory(budget_gib=0, shape="tiny")
    with pytest.raises(ConfigError, match=r"unknown model shape 'huge' \(use --shape tiny, small, 125m, 1b"):
        bench_step.bench_model_config("huge")
    # The estimate is a lower bound: the arrays themselves, plus the dense [seq, seq] matrices.
    qkv = benchmark.attention_bytes(1, 1024, 8, 2, 64, include_dense=False)
    assert qkv >= 2 * 4 * 1024 * (8 + 2 * 2) * 64
    assert benchmark.attention_bytes(1, 1024, 8, 2, 64, include_dense=True) >= qkv + 8 * 1024**2 * 4
    monkeypatch.setattr(benchmark, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"--seq 8192 needs at least .* GiB for the attention .* "
                                          r"0.0 GiB available \(use a smaller --seq\)"):
        benchmark.attention_speed(seq=8192, sp=2)
    with pytest.raises(ConfigError, match="for the layout benchmark"):
        benchmark.layout_speed(seq=8192, sp=2, chunk=512)
    with pytest.raises(ConfigError, match="for the step benchmark"):
        bench_step.step_speed(shape="tiny", seq=512, sp=2)


def test_every_benchmark_refuses_sizes_this_machine_cannot_hold(monkeypatch):
    """balance, generate and data used to start allocating (or writing) whatever they were
    asked for, as only step, attention and layout checked; each now refuses first."""
    from ringformer.errors import ConfigError
    from ringformer.tools import bench_data, bench_generate

    monkeypatch.setattr(benchmark, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"--seq 1048576 needs at least .* for the balance"):
        benchmark.balance(seq_len=2**20, sp=8, chunk=512)
    with pytest.raises(ConfigError, match=r"--lengths 16384 x --batches 8 needs at least .* for "
                                          r"the generate benchmark.* \(use a smaller --lengths\)"):
        bench_generate.generate_bench(lengths=[1024, 16384], batches=[1, 8], sp=1)
    with pytest.raises(ConfigError, match="--lengths 0 must be positive"):
        bench_generate.generate_bench(lengths=[0], batches=[1], sp=1)
    with pytest.raises(ConfigError, match=r"--sizes 1e\+06 needs at least 3000000\.0 GB of free disk"):
        bench_data.data_bench(sizes=(0.1, 1e6))
