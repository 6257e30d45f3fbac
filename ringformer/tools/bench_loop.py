"""Is the host's data work hidden under the device's steps? The training loop, timed three ways.

The same config (configs/tiny.py unless told) trains the same steps in one process:

- `sync_data`: the synchronous loop (no prefetch; every step's metrics read at once), real data;
- `async_data`: the loop as it ships: batches packed and placed on a background thread,
  metrics read a step late;
- `async_prefed`: the same loop fed batches made and placed before it starts: no host data
  work at all, so the device is busy all the time but for dispatch.

Each run logs one row for all its steps; its `tokens_per_sec` excludes compilation
(`compile_s`). `data_vs_prefed` is the ratio of step times async_data / async_prefed (1.0:
the data work is fully hidden). The device's busy fraction of a loop is estimated from these
timestamps as the pre-fed step time over that loop's step time (the pre-fed loop keeps the
device busy; any extra time per step is the device waiting for the host).
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from ringformer.config import config_module
from ringformer.train import loop
from ringformer.train.metrics import read_metrics

_WORDS = ["ring", "attention", "block", "device", "token", "the", "a", "of", "key", "value",
          "query", "softmax", "shard", "mesh", "layer", "norm", "rope", "scan", "sum", "max"]


class _Prefed:
    """Every batch of the run made and placed up front (the loop's `Prefetcher` stand-in)."""

    def __init__(self, source, depth: int = 0, *, n: int):
        del depth
        self._items = []
        for _ in range(n):
            batch = next(source)
            jax.block_until_ready(batch)
            self._items.append((batch, dict(source.state())))
        self._items.reverse()
        self.consumed_state: dict = {}

    def __next__(self):
        batch, self.consumed_state = self._items.pop()
        return batch

    def close(self) -> None:
        self._items = []


def _config(name: str, steps: int, corpus: Path):
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.py"
    c = config_module(path).get_config()
    c.data.train_files, c.data.eval_files = str(corpus), ""
    c.train.steps, c.train.log_every, c.train.save_every = steps, steps, 10**6
    return c


def _corpus(path: Path, n_docs: int = 400) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(_WORDS, int(rng.integers(50, 800))))})
                    + "\n")
    return path


@contextlib.contextmanager
def _patched(**values):
    old = {k: getattr(loop, k) for k in values}
    for k, v in values.items():
        setattr(loop, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(loop, k, v)


def loop_data_vs_prefed(*, config: str = "tiny", steps: int = 12) -> dict:
    """Seconds per step of the three loops (module docstring), `data_vs_prefed` and the
    device's busy fraction of each loop with real data."""
    runs = {"sync_data": {"PREFETCH_DEPTH": 0},
            "async_data": {},
            "async_prefed": {"Prefetcher": functools.partial(_Prefed, n=steps)}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp) / "train.jsonl")
        for name, patch in runs.items():
            c = _config(config, steps, corpus)
            with _patched(**patch):
                loop.train_and_evaluate(c, Path(tmp) / name)
            row = [r for r in read_metrics(Path(tmp) / name) if "tokens_per_sec" in r][-1]
            tokens = c.data.global_batch_size * c.data.seq_len
            rows.append({"loop": name, "seconds_per_step": round(tokens / row["tokens_per_sec"], 4),
                         "tokens_per_sec": round(row["tokens_per_sec"], 1),
                         "compile_s": round(row.get("compile_s", float("nan")), 2)})
    t = {r["loop"]: r["seconds_per_step"] for r in rows}
    for r in rows:
        r["device_busy"] = round(min(t["async_prefed"] / r["seconds_per_step"], 1.0), 3)
    return {"config": config, "steps": steps, "rows": rows,
            "data_vs_prefed": round(t["async_data"] / t["async_prefed"], 4),
            "sync_vs_prefed": round(t["sync_data"] / t["async_prefed"], 4)}
