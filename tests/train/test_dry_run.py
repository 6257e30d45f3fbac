"""The dry run: the step it compiles is the one the trainer runs, its verdict, its errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from _corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.py")


def smoke_config():
    from ringformer.config import config_module

    return config_module(SMOKE).get_config()


def dry(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", SMOKE,
                           "--dry_run", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_dry_run_memory_is_the_real_steps(tmp_path):
    """Compiled from abstract arrays, the step must be the trainer's: the same arguments
    (state and batch shapes, dtypes, shardings) and so the same memory analysis as the step
    compiled on a real state and a real batch from the data pipeline."""
    from ringformer import model, optim
    from ringformer.data import pipeline
    from ringformer.data.tokenizer import load_tokenizer
    from ringformer.mesh import make_mesh
    from ringformer.train import dry_run, loop, state

    config = smoke_config()
    config.data.train_files = str(write_corpus(tmp_path / "train.jsonl", 20, 0))
    report = dry_run.dry_run(config)
    mesh = make_mesh(config.mesh)
    model_cfg = model.ModelConfig.from_config(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    real_state = state.init_state(model_cfg, tx, mesh, 0)
    batch = next(pipeline.TrainIterator(config.data, load_tokenizer(config.data.tokenizer), mesh,
                                        seed=0, layout="zigzag"))
    spec = lambda x: (x.shape, x.dtype, x.sharding)
    assert jax.tree.map(spec, batch) == jax.tree.map(spec, dry_run.abstract_batch(config, mesh))
    assert jax.tree.map(spec, real_state) == jax.tree.map(spec, state.abstract_state(
        model_cfg, tx, mesh))
    compiled = loop.jit_train_step(config, model_cfg, tx, mesh, real_state).lower(
        real_state, batch).compile()
    mem = compiled.memory_analysis()
    assert report["bytes_per_device"] == dry_run.step_bytes(mem)
    assert report["temp_bytes"] == mem.temp_size_in_bytes
    assert report["argument_bytes"] == mem.argument_size_in_bytes
    # Parameters and Adam's two moments, sharded over fsdp=2 (and a step counter).
    assert report["optimizer_bytes"] == pytest.approx(2 * report["param_bytes"], abs=64)
    assert report["fits"] and report["n_devices"] == 8  # it trains: the loop tests run it


def test_a_config_too_large_does_not_fit_and_nothing_is_written(tmp_path):
    proc = dry("--json", "--config.model.n_layers=3", "--device_memory_gib=0.0001",
               "--workdir", str(tmp_path / "run"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["fits"] is False
    assert report["bytes_per_device"] > report["device_memory_bytes"] == int(0.0001 * 2**30)
    assert report["spare_bytes"] == report["device_memory_bytes"] - report["bytes_per_device"]
    assert report["flops_per_step"] > 0
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (("--target", "tpu9000"), "error: unknown GPU target 'tpu9000' (use one of h100)"),
    (("--target", "h100", "--config.mesh.fsdp=-1"), "error: with --target the mesh's -1"),
])
def test_a_bad_target_is_one_error_line(args, message):
    proc = dry(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_dry_run_flags_need_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", SMOKE,
                           "--workdir", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: --json is a dry-run flag (add --dry_run, or drop it)"
    assert not (tmp_path / "run").exists()
