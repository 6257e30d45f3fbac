"""Helpers for tests that start training, evaluation or export as several processes on one
machine (JAX's distributed runtime over loopback, gloo collectives, virtual CPU devices)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")  # 6 steps, checkpoints at 2, 4, 6, eval at 3, 6
HEARTBEAT_S = 10  # how long a silent process counts as alive; bounds the waits below
EXIT_WAIT_S = 120  # generous bound on "exits promptly": several heartbeats, far below a hang
KV2 = "--config.model.n_kv_heads=2"  # tp=2 splits the KV heads: every run uses one model
# Two processes x 4 devices: the ring of each tp column runs over devices 0->2->4->6, so it
# crosses the process boundary at 2->4 and 6->0 (make_mesh fills a host with tp, then sp).
SP4_TP2 = ("--config.mesh.fsdp=1", "--config.mesh.sp=4", "--config.mesh.tp=2", KV2)
# Two processes x 4 devices: the ring crosses the process boundary at 3->4 and 7->0.
SP8 = ("--config.mesh.fsdp=1", "--config.mesh.sp=8", KV2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int, port: int | None = None) -> dict:
    """conftest gives this process (and, through XLA_FLAGS, its children) 8 devices; a child
    of a 2-process run must get the 4 that scripts/train.py asks for instead."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["RINGFORMER_DIST_HEARTBEAT_TIMEOUT"] = str(HEARTBEAT_S)
    env["RINGFORMER_DIST_INIT_TIMEOUT"] = "120"
    env["RINGFORMER_DIST_SHUTDOWN_TIMEOUT"] = "60"
    if port is not None:  # the coordinator listens on loopback only (JAX's default is all)
        env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
    return env


def cmd(workdir, corpus, *extra, train_file=None, evals=True):
    train, eval_file = corpus
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", SMOKE,
            "--workdir", str(workdir), f"--config.data.train_files={train_file or train}",
            f"--config.data.eval_files={eval_file if evals else ''}", *extra]


class Group:
    """Processes of one run; stderr goes to files (gloo is chatty: a pipe could fill up)."""

    def __init__(self, logs: Path):
        self.logs, self.procs, self.files = logs, [], []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, argv, env):
        i = len(self.procs)
        out = open(self.logs / f"stdout.{i}", "w")  # noqa: SIM115 (closed in kill_all)
        err = open(self.logs / f"stderr.{i}", "w")  # noqa: SIM115 (closed in kill_all)
        self.files += [out, err]
        self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err,
                                           text=True))
        return self.procs[-1]

    def stderr(self, i: int) -> str:
        return (self.logs / f"stderr.{i}").read_text(errors="replace")

    def json_lines(self, i: int) -> list[dict]:
        """Process i's stdout lines that are JSON objects (gloo prints its own lines there)."""
        text = (self.logs / f"stdout.{i}").read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_all(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        return codes

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self.files:
            f.close()


def start_processes(group, n, workdir, corpus, *extra, train_files=None, evals=True):
    port = free_port()
    for i in range(n):
        argv = cmd(workdir, corpus, *extra, evals=evals,
                   train_file=None if train_files is None else train_files[i])
        group.start([*argv, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                     f"--process_id={i}"], env_for(8 // n, port))


def run_to_end(group, n, workdir, corpus, *extra, evals=True, timeout=420):
    if n == 1:
        group.start(cmd(workdir, corpus, *extra, evals=evals), env_for(8))
    else:
        start_processes(group, n, workdir, corpus, *extra, evals=evals)
    wait_ok(group, timeout)


def wait_ok(group, timeout: float):
    try:
        codes = group.wait_all(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not finish in {timeout}s: {group.stderr(0)[-2000:]}")
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited {code}: {group.stderr(i)[-3000:]}"


def run_script(group, n, script, *args, timeout=300):
    """scripts/SCRIPT with `args` as n processes of one distributed run (8 devices in all),
    to the end; every process must exit 0."""
    port = free_port() if n > 1 else None
    for i in range(n):
        dist = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                f"--process_id={i}"] if n > 1 else []
        group.start([sys.executable, str(ROOT / "scripts" / script), *map(str, args), *dist],
                    env_for(8 // n, port))
    wait_ok(group, timeout)


def logged_step(workdir) -> int:
    try:
        return max((r["step"] for r in rows(workdir) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def column(workdir, key):
    return {r["step"]: r[key] for r in rows(workdir) if key in r}
