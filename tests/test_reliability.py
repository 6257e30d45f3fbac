"""Reliability end to end, through the real scripts: every bad input ends as one line
`error: <what> (<fix>)` with exit status 2 and nothing the user had is changed; damaged
checkpoints are never restored silently; non-finite steps stop the run (or are skipped, opt in)
without saving non-finite state. docs/reliability.md lists each case with the test here that
proves it. The SIGKILL/SIGTERM crash tests live in tests/test_train.py.

Cost: one compiled smoke run (`trained`) is shared by every test that needs a run; the
skip_nonfinite test compiles one more step program (its lr and skip setting differ).
"""

from __future__ import annotations

import hashlib
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

from ringformer.errors import CheckpointError, DataError
from ringformer.train.workdir import WorkdirLock, missing_dirs, prepare_workdir, remove_unused_workdir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")
TRAIN = str(ROOT / "scripts" / "train.py")
# No eval: the eval step would be one more program to compile, and nothing here is about it.
NO_EVAL = "--config.data.eval_files="


# ----------------------------------------------------------------------------- helpers


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["ring", "block", "device", "token", "the", "of", "key", "value", "query", "mesh"]
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(20, 150))))})
                    + "\n")
    return path


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`, except the lock file: its content is the pid of
    the last run that held it, rewritten by every run, and is not something the user had."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and p.name != ".lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def train(workdir, *args, data, check=False, env=None,
          script: tuple[str, ...] = (TRAIN,)) -> subprocess.CompletedProcess:
    """scripts/train.py on the smoke config. `data` is always given: the config's default
    corpus is git-ignored, and a resume on other data than the run's would not be exact.
    `script`: what python runs instead of scripts/train.py (a fault-injecting runner)."""
    cmd = [sys.executable, *script, "--config", SMOKE, "--workdir", str(workdir), NO_EVAL,
           f"--config.data.train_files={data}"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the only `error:` line; returns it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert lines[-1].endswith(")"), "the fix, in parentheses, ends the line"
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


def assert_lock_free(workdir: Path) -> None:
    with WorkdirLock(workdir) as lock:
        assert lock.held


def flip_bytes(path: Path, at: int = 64, n: int = 8) -> None:
    b = bytearray(path.read_bytes())
    for i in range(at, min(at + n, len(b))):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def biggest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def smoke_config(**overrides):
    from ringformer.config import config_module

    c = config_module(SMOKE).get_config()
    c.data.eval_files = ""
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def all_finite(tree) -> bool:
    import jax

    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """What a user has: a data directory with a good corpus and the bad files of each case."""
    d = tmp_path_factory.mktemp("home")
    data = d / "data"
    data.mkdir()
    write_corpus(data / "train.jsonl")
    (data / "empty.jsonl").write_text("")
    (data / "garbage.jsonl").write_bytes(np.random.default_rng(1).bytes(4096))
    (data / "garbage.parquet").write_bytes(np.random.default_rng(2).bytes(4096))
    (data / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut short\n')
    return d


@pytest.fixture(scope="module")
def trained(home, tmp_path_factory) -> Path:
    """A finished 6-step smoke run with checkpoints at steps 2, 4, 6. Tests copy it before
    changing anything; the ones that only read it check that it stayed as it was."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(workdir, data=home / "data" / "train.jsonl", check=True)
    assert ckpt_steps(workdir) == [2, 4, 6]
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ----------------------------------------------------------------------------- bad input

GOOD = "{home}/data/train.jsonl"

# (id, extra args, fragments of the message). Each runs on a workdir that does not exist yet,
# so the test also checks that a failed first run leaves no directory behind.
BAD_INPUT = [
    ("mesh_does_not_fit_devices", ["--config.mesh.sp=3"],
     ["mesh dp=1 x fsdp=2 x sp=3 x tp=1 = 6 devices, but 8 are available"]),
    ("seq_len_not_divisible_by_sp", ["--config.data.seq_len=130"],
     ["data.seq_len=130 is not divisible by mesh.sp=4", "use a multiple of 4"]),
    ("seq_len_not_divisible_by_chunks", ["--config.data.seq_len=136"],
     ["attention.q_chunk=8 does not divide the 34 tokens each device attends over"]),
    ("n_heads_not_divisible_by_n_kv_heads", ["--config.model.n_kv_heads=3"],
     ["model.n_heads=2 is not divisible by model.n_kv_heads=3"]),
    ("heads_not_divisible_by_tp", ["--config.mesh.fsdp=1", "--config.mesh.tp=2"],
     ["not divisible by mesh.tp=2"]),
    ("unknown_config_key", ["--config.model.nope=1"],
     ["unknown config key 'nope' in --config.model.nope", "ringformer/config.py"]),
    ("misspelt_config_key", ["--config.model.dimm=64"],
     ["unknown config key 'dimm' in --config.model.dimm", 'Did you mean "dim"']),
    ("config_value_of_wrong_type", ["--config.train.steps=many"],
     ["--config.train.steps=many"]),
    ("lr_zero", ["--config.optim.lr=0"], ["optim.lr=0.0 must be positive"]),
    # Named by the flag that set it (it was "config file configs/smoke.py: optim.lr=inf").
    ("lr_inf_by_flag", ["--config.optim.lr=inf"],
     ["error: --config.optim.lr=inf is not a finite float32 number"]),
    ("seed_past_int32_by_flag", ["--config.train.seed", "1099511627776"],
     ["error: --config.train.seed=1099511627776 does not fit a 32-bit integer"]),
    ("lr_negative", ["--config.optim.lr=-0.001"], ["optim.lr=-0.001 must be positive"]),
    ("steps_zero", ["--config.train.steps=0"], ["train.steps=0 must be positive"]),
    ("missing_data_file", ["--config.data.train_files={home}/data/nope.jsonl"],
     ["data file {home}/data/nope.jsonl does not exist", "prepare_data.py"]),
    ("empty_data_file", ["--config.data.train_files={home}/data/empty.jsonl"],
     ["data file {home}/data/empty.jsonl is empty"]),
    ("binary_garbage_jsonl", ["--config.data.train_files={home}/data/garbage.jsonl"],
     ["{home}/data/garbage.jsonl:", "invalid JSON"]),
    ("binary_garbage_parquet", ["--config.data.train_files={home}/data/garbage.parquet"],
     ["cannot read parquet file {home}/data/garbage.parquet"]),
    ("broken_jsonl", ["--config.data.train_files={home}/data/broken.jsonl"],
     ["{home}/data/broken.jsonl:2: invalid JSON"]),
    ("missing_tokenizer", ["--config.data.tokenizer={home}/no_such_tokenizer"],
     ["tokenizer '{home}/no_such_tokenizer' is neither 'byte' nor a local path"]),
]


@pytest.mark.parametrize("args,fragments", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_changes_nothing(home, tmp_path, args, fragments):
    workdir = tmp_path / "runs" / "new"
    args = [a.format(home=home) for a in args]
    before = snapshot(home)
    proc = train(workdir, *args, data=GOOD.format(home=home))
    assert_user_error(proc, *(f.format(home=home) for f in fragments))
    after = snapshot(home)
    assert {k: after.get(k) for k in before} == before  # the user's files, byte for byte
    # Not even an empty directory (or its created parent) that could pass for a run.
    assert not (tmp_path / "runs").exists()


def test_remove_unused_workdir_takes_back_only_what_the_run_created(tmp_path):
    (tmp_path / "runs").mkdir()
    created = missing_dirs(tmp_path / "runs" / "a" / "b")
    assert created == [tmp_path / "runs" / "a" / "b", tmp_path / "runs" / "a"]
    with WorkdirLock(prepare_workdir(tmp_path / "runs" / "a" / "b")):
        (tmp_path / "runs" / "a" / "b" / "checkpoints").mkdir()
        assert remove_unused_workdir(created)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # it existed before
    assert not any((tmp_path / "runs").iterdir())
    # Any file but the lock means the run wrote something: everything stays.
    created = missing_dirs(tmp_path / "runs" / "c")
    prepare_workdir(tmp_path / "runs" / "c")
    (tmp_path / "runs" / "c" / ".lock").write_text("1\n")
    (tmp_path / "runs" / "c" / "checkpoints").mkdir()
    (tmp_path / "runs" / "c" / "checkpoints" / "x").write_text("x")
    assert not remove_unused_workdir(created)
    assert (tmp_path / "runs" / "c" / "checkpoints" / "x").read_text() == "x"


def test_bad_data_on_an_existing_run_leaves_it_untouched(home, trained):
    before = snapshot(trained)
    proc = train(trained, data=home / "data" / "broken.jsonl")
    assert_user_error(proc, "invalid JSON")
    assert snapshot(trained) == before
    assert_lock_free(trained)


@pytest.mark.parametrize("config", ["configs/no_such_config.py", "{home}/syntax_error.py"])
def test_bad_config_file_is_one_line(home, tmp_path, config):
    (home / "syntax_error.py").write_text("def get_config(:\n")
    config = config.format(home=home)
    proc = subprocess.run([sys.executable, TRAIN, "--config", config, "--workdir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    line = assert_user_error(proc, f"config file {config}")
    assert ("does not exist" in line) == ("no_such" in config)
    assert "SyntaxError" in line or "no_such" in config
    assert not (tmp_path / "run").exists()


def test_a_bad_value_set_by_the_config_file_names_the_file(home, tmp_path):
    config = home / "inf_lr.py"
    config.write_text(f"import runpy\n\ndef get_config():\n"
                      f"    c = runpy.run_path({SMOKE!r})['get_config']()\n"
                      f"    c.optim.lr = float('inf')\n    return c\n")
    proc = subprocess.run([sys.executable, TRAIN, "--config", str(config), "--workdir",
                           str(tmp_path / "run"), "--config.optim.b1=0.5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_user_error(proc, f"error: config file {config}: optim.lr=inf is not a finite")


def test_workdir_that_is_a_file_is_refused_and_kept(home, tmp_path):
    f = tmp_path / "run"
    f.write_text("my notes\n")
    proc = train(f, data=GOOD.format(home=home))
    assert_user_error(proc, f"workdir {f} is a regular file, not a directory")
    assert f.read_text() == "my notes\n"


def test_debug_brings_the_traceback_back(home, tmp_path):
    for args, name in ((["--config.model.nope=1"], "KeyError"),
                       ([f"--config.data.train_files={home}/data/broken.jsonl"], "DataError")):
        proc = train(tmp_path / "run", *args, "--debug", data=GOOD.format(home=home))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback (most recent call last)" in proc.stderr and name in proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--limit", "many"], "argument --limit: invalid int value: 'many'"),
    (["--retrieval_examples", "4", "--retrieval_vocab", "100"],
     "--retrieval_vocab 100 leaves no room for merges"),
    (["--retrieval_examples", "4", "--retrieval_warmup_min_tokens", "200",
      "--retrieval_warmup_max_tokens", "100"],
     "--retrieval_warmup_min_tokens is above --retrieval_warmup_max_tokens")])
def test_prepare_data_bad_argument_is_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--out",
                           str(tmp_path / "d"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert_user_error(proc, message)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_model_is_refused(home, run_copy):
    before = snapshot(run_copy)
    proc = train(run_copy, "--config.model.dim=64", data=GOOD.format(home=home))
    assert_user_error(proc, "model.dim: checkpoint 32 vs config 64", "fresh --workdir")
    assert snapshot(run_copy) == before
    assert_lock_free(run_copy)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(home, trained, run_copy):
    damaged = biggest_file(run_copy / "checkpoints" / "6")
    flip_bytes(damaged)
    damaged_bytes = damaged.read_bytes()
    proc = train(run_copy, data=GOOD.format(home=home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 6" in proc.stderr and "does not match its checksum" in proc.stderr
    assert "resuming from checkpoint step 4" in proc.stderr
    # It really resumed at step 4: steps 5 and 6 repeat the original run's losses exactly.
    losses = lambda w: {r["step"]: r["loss"] for r in rows(w)}
    assert [r["step"] for r in rows(run_copy)] == [1, 2, 3, 4, 5, 6]
    assert losses(run_copy) == losses(trained)
    # The damaged step was set aside, not deleted, and a good step 6 replaced it.
    aside = list((run_copy / "checkpoints" / "moved_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("6.invalid.")
    assert (aside[0] / damaged.relative_to(run_copy / "checkpoints" / "6")).read_bytes() == damaged_bytes
    assert ckpt_steps(run_copy) == [2, 4, 6]


def test_all_checkpoints_damaged_stops_and_deletes_nothing(home, run_copy):
    for step in (2, 4):
        flip_bytes(biggest_file(run_copy / "checkpoints" / str(step)))
    newest = biggest_file(run_copy / "checkpoints" / "6")
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a partial copy
    before = snapshot(run_copy)
    proc = train(run_copy, data=GOOD.format(home=home))
    assert_user_error(proc, "no valid checkpoint in", "step 6:", "truncated", "step 2:",
                      "nothing was deleted")
    assert snapshot(run_copy) == before
    assert_lock_free(run_copy)


def test_checkpoints_path_that_is_a_file_is_refused_and_kept(home, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("precious\n")
    before = snapshot(workdir)
    proc = train(workdir, data=GOOD.format(home=home))
    assert_user_error(proc, f"{workdir / 'checkpoints'} is a file, not a directory of checkpoints",
                      "move that file aside")
    assert snapshot(workdir) == before
    assert_lock_free(workdir)


def test_resume_with_fewer_steps_than_done_is_refused_and_writes_nothing(home, run_copy):
    """It exited 0 without a word and left a new, empty TensorBoard file."""
    before = snapshot(run_copy)
    proc = train(run_copy, "--config.train.steps=4", data=GOOD.format(home=home))
    assert_user_error(proc, f"the run in {run_copy} is already at step 6 > train.steps=4",
                      "pass --config.train.steps=N with N > 6 to train further")
    assert snapshot(run_copy) == before
    assert_lock_free(run_copy)


def test_finished_run_started_again_says_so_and_writes_nothing(home, run_copy):
    """A requeued job that finds its run done exits 0, as it did, but says why and adds no file."""
    before = snapshot(run_copy)
    proc = train(run_copy, data=GOOD.format(home=home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already at step 6 = train.steps; nothing to do" in proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    assert snapshot(run_copy) == before


# A failed background save, exactly as the trainer meets it (save, then wait and close in a
# `finally`), without a compile: the checkpoints directory is replaced by a file after the
# checkpoint manager started, so orbax fails to create the step directory in its threads.
FAILED_SAVE = """
import sys
sys.path.insert(0, sys.argv[2])
from ringformer.launch.flags import run_main

def main():
    import jax.numpy as jnp
    from ringformer.train.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep=3)
    ck.directory.rmdir()
    ck.directory.write_text("precious\\n")
    try:
        ck.save(1, {"w": jnp.ones(4)}, data_state={}, config_json={})
    finally:
        ck.wait()
        ck.close()

run_main(main)
"""


def test_failed_background_save_exits_at_once_with_one_line(tmp_path):
    """Orbax's threads waited for a signal the failed save never sent, so the process never
    exited (after ~200 lines of orbax tracebacks)."""
    try:
        proc = subprocess.run([sys.executable, "-c", FAILED_SAVE, str(tmp_path), str(ROOT)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process did not exit after the failed save: {str(e.stderr)[-2000:]}")
    assert_user_error(proc, f"saving a checkpoint in {tmp_path / 'checkpoints'} failed",
                      "NotADirectoryError", "check free disk space and permissions")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]  # the error line alone
    assert (tmp_path / "checkpoints").read_text() == "precious\n"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up, without filling the machine's."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(home, trained, small_disk):
    """With the whole workdir on a full disk the save failed, then the metrics' TensorBoard
    flush failed on the way out and replaced the error with its own traceback, tensorboardX's
    exit hook and thread added two more, and tensorstore printed dozens of `Event loop is
    closed` tracebacks (writes finishing after orbax had closed the failed save's loop)."""
    workdir = small_disk / "run"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir / "checkpoints")
    # Fill the disk but for a little: metric rows still fit, the next checkpoint does not.
    st = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 96 * 1024))
    proc = train(workdir, "--config.train.steps=8", data=home / "data" / "train.jsonl")
    assert_user_error(proc, "No space left on device", "check free disk space")
    # Nothing lost: the earlier checkpoints are as they were, and still restore.
    assert snapshot(workdir / "checkpoints").items() >= before.items()
    from ringformer.train.checkpoint import Checkpointer

    with Checkpointer(workdir, keep=3) as ck:
        assert ck.latest_valid_step() == 6


# ----------------------------------------------------------------------------- the lock


def test_second_trainer_is_refused_while_the_first_runs(home, tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, TRAIN, "--config", SMOKE, "--workdir", str(workdir),
                              NO_EVAL, f"--config.data.train_files={home}/data/train.jsonl"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock_file = workdir / ".lock"
        t0 = time.time()
        # The lock file names its holder once the lock is taken.
        while not (lock_file.exists() and lock_file.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() - t0 < 300, "the first trainer never took the lock"
            time.sleep(0.05)
        # Paused, the first run keeps the lock for as long as the second one needs: no race.
        os.kill(first.pid, signal.SIGSTOP)
        second = train(workdir, data=GOOD.format(home=home))
        assert_user_error(second, f"workdir {workdir} is in use by another run (pid {first.pid})",
                          "wait for it to finish or use another --workdir")
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
    # The refused second run did not disturb the first, which released the lock when done.
    assert [r["step"] for r in rows(workdir)] == [1, 2, 3, 4, 5, 6]
    assert ckpt_steps(workdir) == [2, 4, 6]
    assert_lock_free(workdir)


def test_lock_is_released_on_error_paths_in_process(home, trained, tmp_path):
    """In one process (a notebook, the eval tool) the lock must be given back after an error,
    not only when the process dies; and a first run that fails takes back its workdir."""
    from ringformer.train.loop import train_and_evaluate

    bad_data = smoke_config(**{"data.train_files": str(home / "data" / "broken.jsonl")})
    fresh = tmp_path / "a" / "b"
    with pytest.raises(DataError):
        train_and_evaluate(bad_data, fresh)
    assert not (tmp_path / "a").exists()

    # Failing later, after the checkpoint manager made `checkpoints/` and the state was built
    # (a bad train.init_from), the first run still takes back what it created.
    bad_init = smoke_config(**{"data.train_files": str(home / "data" / "train.jsonl"),
                               "train.init_from": str(tmp_path / "no_such_run")})
    with pytest.raises(CheckpointError, match="is neither a ringformer workdir"):
        train_and_evaluate(bad_init, fresh)
    assert not (tmp_path / "a").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train_and_evaluate(bad_data, existing)
    assert (existing / "notes.txt").read_text() == "mine"
    assert_lock_free(existing)

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    other_model = smoke_config(**{"data.train_files": str(home / "data" / "train.jsonl"),
                                  "model.ffn_dim": 32})
    with pytest.raises(CheckpointError, match=re.escape("model.ffn_dim: checkpoint 64 vs config 32")):
        train_and_evaluate(other_model, copy)
    assert_lock_free(copy)


# ----------------------------------------------------------------------------- numerical faults


# scripts/train.py with one fault: the batch of step N (argv[1]) gets a NaN loss mask, so the
# real step function sees a non-finite loss and gradients. The library has no hook for it: the
# runner wraps the data iterator. Importing the pipeline starts jax before train.py could give
# it devices; the XLA_FLAGS that conftest.py exports (8 devices, the smoke mesh) apply instead.
NAN_AT_STEP_RUNNER = f"""
import runpy
import sys

sys.path.insert(0, {str(ROOT)!r})
import jax.numpy as jnp

from ringformer.data import pipeline

nan_at_step = int(sys.argv.pop(1))
real_next = pipeline.TrainIterator.__next__


def next_with_fault(self):
    batch = real_next(self)
    if self.batches == nan_at_step:  # a fresh run: the batch of step N is the N-th
        batch = {{**batch, "loss_mask": batch["loss_mask"] * jnp.nan}}
    return batch


pipeline.TrainIterator.__next__ = next_with_fault
sys.argv[0] = {TRAIN!r}
runpy.run_path({TRAIN!r}, run_name="__main__")
"""


def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(home, trained, tmp_path):
    """The fault is injected (a NaN loss mask at step 4, through the real step function) so
    the run is the `trained` one, compiled program included, up to the fault."""
    from ringformer.train.state import restore_run

    workdir = tmp_path / "run"
    runner = tmp_path / "train_with_nan_at_step.py"
    runner.write_text(NAN_AT_STEP_RUNNER)
    proc = train(workdir, "--config.train.save_every=1", data=GOOD.format(home=home),
                 script=(str(runner), "4"))
    assert_user_error(proc, "non-finite loss, gradient norm or update at step 4 (loss=nan",
                      "the last good checkpoint is kept", "train.skip_nonfinite=True")
    # Steps 1-3 are the trained run's, each was saved; nothing at or after step 4 was.
    logged = {r["step"]: r["loss"] for r in rows(workdir)}
    assert logged == {s: loss for s, loss in
                      ((r["step"], r["loss"]) for r in rows(trained)) if s < 4}
    assert ckpt_steps(workdir) == [1, 2, 3]
    _, state = restore_run(workdir)
    assert int(state.step) == 3
    assert all_finite(state.params) and all_finite(state.opt_state)
    assert_lock_free(workdir)


def test_skip_nonfinite_completes_and_counts_skipped_steps(home, tmp_path):
    """A real divergence: with lr=1e30 the first updates blow the weights up to ~1e29 (still
    finite) and the next gradient overflows. No test-only hook is involved."""
    from ringformer.train.state import restore_run

    workdir = tmp_path / "run"
    # Every step saved and kept, so the state after the last finite step is on disk too.
    proc = train(workdir, "--config.optim.lr=1e30", "--config.train.skip_nonfinite=True",
                 "--config.train.save_every=1", "--config.train.keep_checkpoints=10",
                 data=GOOD.format(home=home))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = rows(workdir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    # log_every=1: each row is one step; a skipped one has no loss (null in the JSON).
    skipped = [r["step"] for r in logged if r["loss"] is None]
    assert skipped, "lr=1e30 should have produced non-finite steps"
    first = skipped[0]
    assert skipped == list(range(first, 7))  # the state never recovers from ~1e29 weights
    assert [r["skipped_steps"] for r in logged] == [max(0, s - first + 1) for s in range(1, 7)]
    # The run counted all 6 steps, but no skipped step changed the parameters or moments:
    # the final state is the state after the last finite step, and all finite.
    _, final = restore_run(workdir)
    assert int(final.step) == 6 and all_finite(final.params) and all_finite(final.opt_state)
    import jax

    _, good = restore_run(workdir, step=first - 1)
    for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(final.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
