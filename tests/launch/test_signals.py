"""Signals in a multi-process run before the training loop (the loop's own SIGTERM handling,
a save at the same step on every process, is tested in test_multihost.py)."""

import signal
import subprocess
import time

import pytest
from _multiproc import EXIT_WAIT_S, HEARTBEAT_S, start_processes


def test_a_signal_before_the_loop_stops_every_process_with_the_same_error(corpus, group, tmp_path):
    """SIGTERM before the loop (reading data, compiling) stopped only the process it reached:
    its peers waited in a collective for it until the heartbeat timeout, then died with a
    message that did not say why. They now leave at once with its error."""
    workdir = tmp_path / "run"
    start_processes(group, 2, workdir, corpus, evals=False)
    p0, p1 = group.procs
    lock = workdir / ".lock"
    deadline = time.monotonic() + 120
    # Process 0 holds the run's lock from the moment it enters the trainer (with its signal
    # handler) until it leaves; both processes are then past start-up, before the loop.
    while not (lock.is_file() and lock.read_text().strip() == str(p0.pid)):
        assert p0.poll() is None and p1.poll() is None, group.stderr(0)[-2000:]
        assert time.monotonic() < deadline, "process 0 never entered the trainer"
        time.sleep(0.05)
    time.sleep(0.2)
    p0.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        codes = group.wait_all(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("process 1 hung after process 0 was interrupted: " + group.stderr(1)[-2000:])
    if (workdir / "metrics.jsonl").is_file():
        pytest.skip("the signal came after the loop had started (a slow machine)")
    assert codes == [130, 130], [group.stderr(i)[-2000:] for i in range(2)]
    # Promptly: the watchdog polls once a second; the heartbeat would take HEARTBEAT_S or more.
    assert time.monotonic() - t0 < HEARTBEAT_S, group.stderr(1)[-2000:]
    assert group.stderr(0).strip().splitlines()[-1] == \
        "error: interrupted (run the same command again to resume)"
    assert "error: process 0 of 2 failed, stopping process 1: interrupted (run the same command" \
           " again to resume)" in group.stderr(1), group.stderr(1)[-2000:]
