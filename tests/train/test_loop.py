"""The trainer end to end: outputs, metrics, and bitwise-exact resume after stops and kills."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _corpus import write_corpus

from ringformer.config import validate
from ringformer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "train.jsonl", 60, 0), write_corpus(d / "eval.jsonl", 8, 1)


def train_cmd(workdir, corpus, *extra):
    train, evals = corpus
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", SMOKE,
            "--workdir", str(workdir), f"--config.data.train_files={train}",
            f"--config.data.eval_files={evals}", *extra]


def run_train(workdir, corpus, *extra, check=True):
    proc = subprocess.run(train_cmd(workdir, corpus, *extra), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
    from ringformer.train.state import restore_run

    _, state = restore_run(workdir)
    import jax
    return int(state.step), [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    run_train(workdir, corpus)
    return workdir


def assert_same_run(a, b):
    step_a, params_a = final_params(a)
    step_b, params_b = final_params(b)
    assert step_a == step_b == 6
    for x, y in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise
    losses = lambda w: {r["step"]: r["loss"] for r in rows(w) if "loss" in r}
    assert losses(a) == losses(b)
    evals = lambda w: {r["step"]: r["eval_loss"] for r in rows(w) if "eval_loss" in r}
    assert evals(a) == evals(b)


def test_run_writes_every_output(straight):
    for name in ("config.json", "metrics.jsonl", "loss.png"):
        assert (straight / name).is_file(), name
    assert any((straight / "tb").iterdir())
    steps = sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]  # keep_checkpoints=3 keeps all three
    saved = json.loads((straight / "config.json").read_text())
    assert saved["model"]["dim"] == 32 and saved["mesh"]["sp"] == 4


def test_metrics_rows_are_complete_and_finite(straight):
    train_rows = [r for r in rows(straight) if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
            assert np.isfinite(r[key]), (key, r)
    eval_rows = [r for r in rows(straight) if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for r in eval_rows:
        assert np.isclose(r["eval_ppl"], np.exp(r["eval_loss"]))
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


NAN_RUNNER = """
import runpy, sys
import jax.numpy as jnp
from ringformer.data import pipeline
nan_at, real_next = int(sys.argv.pop(1)), pipeline.TrainIterator.__next__
def faulty(self):
    batch = real_next(self)
    return {**batch, "loss_mask": batch["loss_mask"] * jnp.nan} if self.batches == nan_at else batch
pipeline.TrainIterator.__next__ = faulty
sys.argv.pop(0)  # now train.py's own argv
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_non_finite_step_read_a_step_late_stops_at_that_step(straight, corpus, tmp_path):
    """Step 3 is neither saved nor evaluated, so its metrics are read after step 4 is queued:
    the run must still name step 3, keep checkpoint 2 and log nothing past step 2."""
    runner = tmp_path / "nan_runner.py"
    runner.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + NAN_RUNNER)
    cmd = train_cmd(tmp_path / "run", corpus, "--config.train.eval_every=100")
    proc = subprocess.run([cmd[0], str(runner), "3", *cmd[1:]], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite loss" in proc.stderr and "at step 3 (loss=nan" in proc.stderr
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2"]
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]
    assert [r["loss"] for r in rows(tmp_path / "run")] == [r["loss"] for r in rows(straight)[:2]]


def test_mfu_of_a_row_by_hand(straight):
    """Smoke model: per layer wq 32*32 + wk,wv 2*32*16 + wo 32*32 + SwiGLU 3*32*64 = 9216
    weights, two layers plus the head 32*259: 26720, times 6; causal attention
    12*2*128*32/2 = 49152. MFU is against 8 devices at the configured 1e11 FLOP/s."""
    first = rows(straight)[0]
    assert first["peak_flops"] == 1e11 and first["peak_flops_source"] == "config: train.peak_flops"
    assert first["compile_s"] > 0
    assert "compile_s" not in rows(straight)[1]
    flops_per_token = 6 * 26720 + 49152
    assert first["mfu"] == pytest.approx(first["tokens_per_sec"] * flops_per_token / (8 * 1e11))
    saved = json.loads((straight / "config.json").read_text())
    assert saved["throughput"] == {"peak_flops": 1e11, "peak_flops_source": "config: train.peak_flops"}


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "exited"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def logged_step(workdir):
    try:
        return max((r["step"] for r in rows(workdir) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigterm_saves_the_current_step_and_resume_is_bitwise(straight, corpus, tmp_path):
    proc = subprocess.Popen(train_cmd(tmp_path, corpus, "--config.train.save_every=100"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_step(tmp_path) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    stopped = logged_step(tmp_path)
    assert stopped < 6
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped]  # save_every=100: only the signal's own checkpoint exists
    run_train(tmp_path, corpus, "--config.train.save_every=100")
    assert_same_run(straight, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_any_checkpoint", "during_checkpoint_write",
                                    "after_checkpoint"])
def test_sigkill_then_resume_is_bitwise(straight, corpus, tmp_path, moment):
    proc = subprocess.Popen(train_cmd(tmp_path, corpus), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "checkpoints"
    if moment == "before_any_checkpoint":
        wait_for(lambda: logged_step(tmp_path) >= 1, proc)
    elif moment == "during_checkpoint_write":
        # Orbax writes into a temporary directory and renames it when done.
        wait_for(lambda: ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir()), proc)
    else:
        wait_for(lambda: (ckpts / "2" / "COMMITTED").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_train(tmp_path, corpus)
    assert_same_run(straight, tmp_path)


def test_the_asynchronous_loop_matches_the_synchronous_one(straight, corpus, tmp_path,
                                                          monkeypatch):
    """Prefetched batches and metrics read a step late change when the host waits, never what
    is computed or saved: the synchronous loop (no prefetch) gives the same rows, parameters
    and checkpoints, data positions included (those of the batches trained on)."""
    from ringformer.train import loop
    from ringformer.train.checkpoint import Checkpointer

    monkeypatch.setattr(loop, "PREFETCH_DEPTH", 0)
    config = smoke_config()
    config.data.train_files, config.data.eval_files = (str(f) for f in corpus)
    loop.train_and_evaluate(config, tmp_path)
    assert_same_run(straight, tmp_path)
    for step in (2, 4, 6):
        with Checkpointer(straight, keep=3) as a, Checkpointer(tmp_path, keep=3) as b:
            assert a.read_json(step)[0] == b.read_json(step)[0]
            assert a.read_json(step)[0]["batches"] == step


def test_resume_between_two_log_rows_logs_the_same_rows(corpus, tmp_path):
    """Rows average the steps since the last row; those before a stop must survive it."""
    every = ("--config.train.log_every=4", "--config.train.save_every=3")
    run_train(tmp_path / "a", corpus, *every)
    assert [r["step"] for r in rows(tmp_path / "a") if "loss" in r] == [4, 6]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")  # as if killed after step 3's save
    run_train(tmp_path / "b", corpus, *every)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_export_records_the_trained_context(straight, tmp_path):
    """A run without a position limit exports its training length, not an invented one."""
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), "export",
                           "--workdir", str(straight), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128
    from ringformer.model import ModelConfig
    config = smoke_config()
    config.model.max_position = 64  # built for 64 positions, trained at 128: extended
    assert ModelConfig.from_config(config).max_position == 128


def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    """Accumulating 2 microbatches gives the losses of the whole batch in one pass."""
    common = ("--config.train.steps=2", "--config.train.eval_every=100", "--config.mesh.fsdp=1",
              "--config.mesh.dp=2", "--config.data.global_batch_size=4")
    run_train(tmp_path / "whole", corpus, *common)
    run_train(tmp_path / "accum", corpus, *common, "--config.optim.grad_accum_steps=2")
    whole = [r["loss"] for r in rows(tmp_path / "whole") if "loss" in r]
    accum = [r["loss"] for r in rows(tmp_path / "accum") if "loss" in r]
    assert len(whole) == 2
    np.testing.assert_allclose(accum, whole, rtol=2e-5)


# ----------------------------------------------------------------------------- validation


def smoke_config():
    from ringformer.config import config_module

    return config_module(SMOKE).get_config()


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", 0, "train.steps=0 must be positive"),
    ("optim.lr", -1.0, "optim.lr=-1.0 must be positive"),
    ("mesh.sp", 3, "= 6 devices, but 8 are available"),
    ("data.seq_len", 102, "data.seq_len=102 is not divisible by mesh.sp=4"),
    ("model.n_kv_heads", 3, "model.n_heads=2 is not divisible by model.n_kv_heads=3"),
    ("attention.q_chunk", 12, "attention.q_chunk=12 does not divide"),
    ("attention.impl", "flash", "attention.impl='flash' is not one of"),
    ("attention.pipeline_grads", "yes", "attention.pipeline_grads='yes' is not one of"),
    ("attention.kernel", "cuda", "attention.kernel='cuda' is not one of"),
    ("attention.kernel", "pallas", "needs ring or blockwise attention over a multiple of 128 tokens"),
    ("data.global_batch_size", 3, "data.global_batch_size=3 is not divisible by dp*fsdp=2"),
    ("data.global_batch_size", 0, "data.global_batch_size=0 must be positive"),
    ("data.global_batch_size", -2, "data.global_batch_size=-2 must be positive"),
    ("train.eval_batches", 0, "train.eval_batches=0 evaluates nothing"),
    ("train.eval_batches", -1, "train.eval_batches=-1 is negative"),
    ("model.rope_theta", 0.0, "model.rope_theta=0.0 must be positive"),
    ("model.norm_eps", 0.0, "model.norm_eps=0.0 must be positive"),
])
def test_validation_names_the_problem(key, value, message):
    config = smoke_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config, 8)


def test_tp_must_divide_heads():
    config = smoke_config()
    config.mesh.update(fsdp=1, sp=4, tp=2)
    with pytest.raises(ConfigError, match=re.escape("not divisible by mesh.tp=2")):
        validate(config, 8)


@pytest.mark.parametrize("overrides,message", [
    ({"rope_scaling": "llama3", "rope_scaling_factor": 0.0}, "rope_scaling_factor=0.0 must be positive"),
    ({"rope_scaling": "linear", "rope_scaling_factor": -1.0}, "rope_scaling_factor=-1.0 must be positive"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "need 0 < low < high"),
    ({"rope_scaling": "llama3", "rope_low_freq_factor": 0.0}, "need 0 < low < high"),
    ({"rope_scaling": "llama3", "rope_original_max_position": 0}, "rope_original_max_position=0"),
])
def test_rope_scaling_values_are_checked(overrides, message):
    """Each is a divisor in model.rope_inv_freq: unchecked, it ran into NaN after the compile."""
    config = smoke_config()
    config.model.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config, 8)
    config.model.rope_scaling = "none"  # the factors mean nothing without scaling
    validate(config, 8)


def test_no_evaluation_is_an_empty_eval_files():
    config = smoke_config()
    config.train.eval_batches = 0
    config.data.eval_files = ""
    validate(config, 8)


def _broken(change):
    config = smoke_config()
    change(config)
    return config


def _only_train():
    import ml_collections
    return ml_collections.ConfigDict({"train": smoke_config().train})


def _delete(section, key):
    def change(config):
        del config[section][key]
    return change


def _retype(section, key, value):
    """Swap a value for one of another type, as a config file that rebuilds a key can."""
    def change(config):
        del config[section][key]
        config[section][key] = value
    return change


@pytest.mark.parametrize("config,message", [
    (lambda: {"train": {"steps": 1}}, "the config is a dict, not an ml_collections.ConfigDict"),
    (lambda: _only_train(), "config section 'attention' is missing"),
    (lambda: _broken(_delete("model", "rope_scaling")), "config key model.rope_scaling is missing"),
    (lambda: _broken(_retype("mesh", "sp", None)), "mesh.sp=None is not an integer"),
    (lambda: _broken(_retype("train", "steps", 10.0)), "train.steps=10.0 is not an integer"),
    (lambda: _broken(_retype("model", "dim", True)), "model.dim=True is not an integer"),
    (lambda: _broken(_retype("model", "dtype", 16)), "model.dtype=16 is not a string"),
    (lambda: _broken(lambda c: c.model.update(rope_scale=8.0)), "unknown config key model.rope_scale"),
])
def test_config_structure_is_checked(config, message):
    """A config file that does not build on default_config() is one error, not an AttributeError."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config(), 8)


@pytest.mark.parametrize("name,arg,n_devices", [
    ("tiny", None, 8), ("smoke", None, 8), ("llama_1b_32k", None, 1),
    *[("llama2_7b_long", f"ctx={c}", n) for c in ("32k", "128k", "256k", "512k", "1m")
      for n in (256, 512)],
])
def test_shipped_configs_validate(name, arg, n_devices):
    from ringformer.config import config_module

    validate(config_module(ROOT / "configs" / f"{name}.py").get_config(arg), n_devices)


def test_virtual_devices_are_capped():
    from ringformer.launch.flags import MAX_DEVICES_PER_PROCESS, devices_for_mesh

    mesh = {"dp": 1, "fsdp": 2, "sp": 256, "tp": 1}
    assert devices_for_mesh(mesh) == MAX_DEVICES_PER_PROCESS == 512
    assert devices_for_mesh({**mesh, "sp": 1000}, num_processes=4) == 500
    for sp in (1000, 20000):
        with pytest.raises(ConfigError, match=f"needs {2 * sp} devices in one process"):
            devices_for_mesh({**mesh, "sp": sp})


@pytest.mark.parametrize("config,args,message", [
    (SMOKE, ("--config.mesh.sp=20000",), "mesh dp=1 x fsdp=2 x sp=20000 x tp=1 needs 40000 devices"),
    (SMOKE, ("--config.data.global_batch_size=0",), "data.global_batch_size=0 must be positive"),
    ("{tmp}/dict_config.py", (), "dict_config.py: the config is a dict"),
    ("{tmp}/none_sp.py", (), "none_sp.py: mesh.sp=None is not an integer"),
])
def test_train_script_checks_the_config_before_jax_starts(tmp_path, config, args, message):
    """scripts/train.py sizes the CPU devices from config.mesh before jax starts; a config that
    cannot work ends there as one line (no traceback, no hang, no workdir), not inside jax."""
    (tmp_path / "dict_config.py").write_text("def get_config(arg=None):\n    return {'mesh': {}}\n")
    (tmp_path / "none_sp.py").write_text(
        f"import importlib.util\nspec = importlib.util.spec_from_file_location('s', {SMOKE!r})\n"
        "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n\n\n"
        "def get_config(arg=None):\n    c = m.get_config()\n    c.mesh.sp = None\n    return c\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config.format(tmp=tmp_path),
           "--workdir", str(tmp_path / "run"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_init_from_a_hugging_face_model(corpus, tmp_path):
    """A run can start from a local HF LLaMA (the first rung of a context-extension ladder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ringformer.hf.mapping import load_llama

    hf_dir = tmp_path / "hf"
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    run_train(tmp_path / "run", corpus, f"--config.train.init_from={hf_dir}",
              "--config.train.steps=1", "--config.optim.lr=1e-12", "--config.optim.warmup_steps=0",
              "--config.train.eval_every=100")
    _, params = final_params(tmp_path / "run")
    import jax
    expected = jax.tree.leaves(load_llama(str(hf_dir))[1])
    for got, want in zip(params, expected, strict=True):
        np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=1e-6)


def test_fine_tuning_an_import_uses_the_fine_tune_config(corpus, tmp_path):
    """`convert_hf.py import` writes step 0 with default optimizer and seed; training from it
    must start from those weights under its own optimizer (no clipping here), seed and config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ringformer.hf.mapping import load_llama

    hf_dir, run = tmp_path / "hf", tmp_path / "run"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=256)).save_pretrained(hf_dir)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), "import",
                           str(hf_dir), "--workdir", str(run)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_train(run, corpus, "--config.optim.clip_norm=0", "--config.train.seed=5",
              "--config.train.steps=1", "--config.optim.lr=1e-12", "--config.optim.warmup_steps=0",
              "--config.train.eval_every=100", "--config.model.max_position=256")
    step, params = final_params(run)
    import jax
    assert step == 1
    for got, want in zip(params, jax.tree.leaves(load_llama(str(hf_dir))[1]), strict=True):
        np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=1e-6)
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["clip_norm"] == 0 and saved["train"]["seed"] == 5
    from ringformer.train.checkpoint import Checkpointer
    with Checkpointer(run, keep=3) as ckpt:
        assert ckpt.read_json(1)[0]["seed"] == 5  # this run's data order, not the import's


def test_a_signal_during_the_stop_flag_exchange_counts_at_the_next_step(monkeypatch):
    """Processes must leave the loop at the same step. A SIGTERM that lands while the flags
    are being exchanged was not in them, so the peers step on: this process must too, and
    stop (with them) after the next exchange."""
    import jax
    from jax.experimental import multihost_utils

    from ringformer.train import loop as train

    stop = train._StopSignal()
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def exchange_as_the_signal_lands(flag):
        stop._handle(signal.SIGTERM, None)
        return np.array([flag, 0])  # the peer had no signal either

    monkeypatch.setattr(multihost_utils, "process_allgather", exchange_as_the_signal_lands)
    assert not stop.agreed()
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: np.array([flag, 0]))
    assert stop.agreed() and stop.received == signal.SIGTERM


def test_an_update_that_overflows_is_never_applied():
    """The issue's serious case: loss and gradient finite, the update not (an lr of inf).
    The step keeps the old state and reports the step as non-finite, so the host stops (or
    skips) before a save; before, the NaN parameters were kept and checkpointed."""
    import jax
    import jax.numpy as jnp
    import optax

    from ringformer.config import ModelConfig
    from ringformer.mesh import make_mesh
    from ringformer.train import loop as train
    from ringformer.train.state import init_state

    config = smoke_config()
    config.mesh.update(dp=1, fsdp=8, sp=1, tp=1)
    config.attention.layout = "contiguous"
    cfg, mesh = ModelConfig.from_config(config), make_mesh(config.mesh)
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-float("inf")))
    state = init_state(cfg, tx, mesh, seed=0)
    tokens = jnp.arange(8 * 32, dtype=jnp.int32).reshape(8, 32) % 200
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones_like(tokens, jnp.float32),
             "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (8, 32)),
             "segment_ids": jnp.ones_like(tokens)}
    before = jax.device_get(state.params)
    for skip in (False, True):
        new, m = jax.jit(train.make_train_step(cfg, tx, mesh, skip_nonfinite=skip))(state, batch)
        assert bool(jnp.isfinite(m["loss"])) and bool(jnp.isfinite(m["grad_norm"]))
        assert not bool(m["finite"])
        assert int(new.step) == (1 if skip else 0)
        for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(before),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_signals_are_never_swallowed():
    """Before the loop (reading data, compiling) there is no step to save: a signal stops at
    once (a read that never returns once hid SIGTERM and Ctrl-C). In the loop the first asks
    for a save at the current step; a second, when that save is not coming, stops at once."""
    from ringformer.train import loop as train

    with train._StopSignal(armed=False) as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert stop.received is None
    with train._StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
