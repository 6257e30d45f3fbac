"""Workdir checks and the run lock, in this process and across processes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ringformer.errors import UserError
from ringformer.train.workdir import WorkdirLock, prepare_workdir

ROOT = Path(__file__).resolve().parents[2]


def test_prepare_workdir_refuses_a_file_and_leaves_it_alone(tmp_path):
    f = tmp_path / "run"
    f.write_text("precious")
    with pytest.raises(UserError) as e:
        prepare_workdir(f)
    assert "is a regular file" in e.value.what and "--workdir" in e.value.fix
    assert f.read_text() == "precious"


def test_prepare_workdir_creates_nested_and_accepts_existing(tmp_path):
    d = prepare_workdir(tmp_path / "a" / "b")
    assert d.is_dir()
    assert prepare_workdir(d) == d


def test_prepare_workdir_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError):
        prepare_workdir(tmp_path / "f" / "run")


def test_second_lock_in_process_is_refused_with_pid(tmp_path):
    with WorkdirLock(tmp_path) as first:
        assert first.held
        with pytest.raises(UserError) as e:
            WorkdirLock(tmp_path).acquire()
        assert e.value.what == f"workdir {tmp_path} is in use by another run (pid {os.getpid()})"
        assert e.value.fix == "wait for it to finish or use another --workdir"
    with WorkdirLock(tmp_path):  # released on normal exit
        pass


def test_lock_released_when_body_raises(tmp_path):
    with pytest.raises(RuntimeError), WorkdirLock(tmp_path):
        raise RuntimeError("boom")
    lock = WorkdirLock(tmp_path).acquire()
    lock.release()
    assert not lock.held


HOLD = """
import sys, time
from ringformer.train.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_held_by_other_process_then_freed_by_sigkill(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            WorkdirLock(tmp_path).acquire()
        assert f"(pid {child.pid})" in e.value.what
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # the kernel dropped the dead process's flock: the next run gets the workdir
    with WorkdirLock(tmp_path) as lock:
        assert lock.held
    assert (tmp_path / ".lock").exists()
