"""JAX's distributed runtime: start-up with bounded timeouts, and a watchdog that makes every
process leave together when one of them fails (instead of hanging in a collective)."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import sys
import threading
import time

import jax

from ringformer.errors import UserError

# Bounds on JAX's distributed runtime, in seconds (env overrides for tests and slow clusters).
# initialization: how long processes wait for each other at start-up (hosts of a SLURM job or
# TPU pod start minutes apart); heartbeat: a process silent this long is dead, and the
# coordination service then terminates every other one instead of leaving them blocked in a
# collective forever; shutdown: how long a finished process waits for the others at exit.
TIMEOUT_ENV = {"initialization_timeout": ("RINGFORMER_DIST_INIT_TIMEOUT", 300),
               "heartbeat_timeout_seconds": ("RINGFORMER_DIST_HEARTBEAT_TIMEOUT", 60),
               "shutdown_timeout_seconds": ("RINGFORMER_DIST_SHUTDOWN_TIMEOUT", 120)}
_ERROR_KEY = "ringformer/error"
_ACK_DIR = "ringformer/error_ack/"
_DONE_KEY = "ringformer/error_done"
_watchdog = None
_exit_lock = threading.Lock()  # held by the thread that makes this process leave after a peer


def distributed_timeouts() -> dict[str, int]:
    out = {}
    for arg, (env, default) in TIMEOUT_ENV.items():
        value = os.environ.get(env, "")
        out[arg] = int(value) if value.strip().isdigit() and int(value) > 0 else default
    return out


def _cluster_env() -> bool:
    """Whether JAX's auto-detection should run: a SLURM step with several tasks, a TPU pod
    worker, or RINGFORMER_DISTRIBUTED=auto (e.g. Cloud TPU VMs, which JAX reads from the
    metadata server rather than the environment). RINGFORMER_DISTRIBUTED=off disables it."""
    mode = os.environ.get("RINGFORMER_DISTRIBUTED", "").lower()
    if mode in ("off", "0", "no"):
        return False
    if mode in ("auto", "1", "yes"):
        return True
    # SLURM_JOB_ID alone is also set for a single process inside an allocation; JAX's SLURM
    # detection needs a step with its task count, and one task needs no runtime.
    tasks = os.environ.get("SLURM_NTASKS", "1")
    slurm = "SLURM_STEP_NODELIST" in os.environ and tasks.isdigit() and int(tasks) > 1
    tpu = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"))
    return slurm or tpu


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Start JAX's multi-controller runtime when asked; on one process this does nothing.

    With explicit flags it connects to the coordinator; with none, JAX's own auto-detection
    (SLURM, TPU pods) applies when the environment shows a cluster. CPU processes talk over gloo.
    Timeouts are bounded (`distributed_timeouts`), and a watchdog makes an error on any
    process stop all of them (`stop_peers`).
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not explicit and not _cluster_env():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = distributed_timeouts()
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                       process_id=process_id, **timeouts)
        else:
            jax.distributed.initialize(**timeouts)
    except Exception as e:  # unreachable coordinator, missing peers, bad ids, busy port
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = (f"coordinator {coordinator_address}, process {process_id} of {num_processes}"
                 if explicit else "auto-detected cluster")
        raise UserError(
            f"the distributed runtime did not start ({where}): {first}",
            "start every process with the same --coordinator_address and --num_processes and "
            "its own --process_id; all must start within RINGFORMER_DIST_INIT_TIMEOUT="
            f"{timeouts['initialization_timeout']}s") from e
    if jax.process_count() > 1:
        _start_watchdog()


def _client():
    from jax._src import distributed  # the runtime's key-value store has no public handle

    return distributed.global_state.client


def _start_watchdog() -> None:
    """Poll the coordinator for an error another process published (see `stop_peers`).

    A process blocked in a collective cannot notice that a peer raised and left: without
    this it would wait until the heartbeat timeout and then die with a message that does not
    say what went wrong. The poll is one small RPC a second.
    """
    global _watchdog
    stop = threading.Event()
    # A peer vanishing mid-collective can crash the collective library itself; a Python
    # traceback on the fatal signal then says where this process was, instead of nothing.
    faulthandler.enable()

    def watch():
        client, me = _client(), jax.process_index()
        while not stop.wait(1.0):
            try:
                value = client.key_value_try_get(_ERROR_KEY)
            except Exception:  # not set (NOT_FOUND), or the coordinator is gone: JAX's
                continue       # heartbeat handles the latter within its timeout
            if int(value.split("\n", 1)[0]) == me:
                return
            _follow(client, me, value)

    thread = threading.Thread(target=watch, name="ringformer-peer-watchdog", daemon=True)
    thread.start()
    _watchdog = (thread, stop)

    def halt():  # before jax's own atexit shutdown (atexit runs last-registered first)
        stop.set()
        thread.join(timeout=5)

    atexit.register(halt)

    previous_hook = sys.excepthook

    def hook(kind, value, tb):  # an unexpected exception: traceback here, first line to peers
        if _exit_lock.locked():  # a peer failed first and this one is leaving because of it
            _exit_lock.acquire()  # (its collective broke): the watchdog exits, say nothing
        previous_hook(kind, value, tb)
        first = str(value).strip().splitlines()[0] if str(value).strip() else ""
        message = f"error: {kind.__name__}: {first}"
        print(f"{message} (process {jax.process_index()}; the traceback is above)",
              file=sys.stderr, flush=True)
        stop_peers(message, 1)
        _hard_exit(1)

    sys.excepthook = hook


def distributed_watchdog():
    """The peer watchdog thread of a multi-process run, or None."""
    return None if _watchdog is None else _watchdog[0]


def _hard_exit(code: int):
    """Exit now, skipping atexit and so JAX's shutdown barrier, which would wait (up to its
    timeout) for peers that are leaving too."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _follow(client, me: int, published: str):
    """Leave because another process failed: show its error, confirm, exit with its status."""
    _exit_lock.acquire()  # once per process (watchdog or main thread); never released
    who, code, message = published.split("\n", 2)
    print(f"error: process {who} of {jax.process_count()} failed, stopping process {me}: "
          f"{message.removeprefix('error: ')}", file=sys.stderr, flush=True)
    try:
        client.key_value_set(f"{_ACK_DIR}{me}", "1")
        if me == 0:
            # The coordination service lives here: leaving first would make the failing
            # process's JAX client abort before it exits with its own status.
            client.blocking_key_value_get(_DONE_KEY, 15_000)
            time.sleep(0.5)
    except Exception:
        pass
    _hard_exit(int(code))


def stop_peers(message: str, code: int, *, wait_s: float = 10.0) -> None:
    """In a multi-process run, make every other process exit with `message` and `code`.

    Publishes the error in the coordination service's key-value store, where each peer's
    watchdog finds it within a second, and waits (at most `wait_s`) until they confirm, so
    the error reaches them before the caller exits (without JAX's shutdown barrier). If
    another process failed first, this one follows that error instead and does not return.
    A no-op on one process.
    """
    if _watchdog is None or jax.process_count() < 2:
        return
    client, me, n = _client(), jax.process_index(), jax.process_count()
    try:
        client.key_value_set(_ERROR_KEY, f"{me}\n{code}\n{message}")
    except Exception:  # another process's error came first (or the coordinator is gone)
        try:
            first = client.key_value_try_get(_ERROR_KEY)
        except Exception:
            return
        _follow(client, me, first)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if len(client.key_value_dir_get(_ACK_DIR)) >= n - 1:
                break
        except Exception:
            return
        time.sleep(0.1)
    with contextlib.suppress(Exception):  # the coordinator may be gone; leaving anyway
        client.key_value_set(_DONE_KEY, "1")
