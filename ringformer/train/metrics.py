"""Throughput accounting (FLOPs per token, MFU) and the run's metric outputs.

The FLOP convention is written down in docs/metrics.md; `flops_per_token` is its only
implementation. `MetricsLogger` writes `DIR/metrics.jsonl` (one JSON object per logged
step) and the same scalars to TensorBoard in `DIR/tb/`; `plot_metrics` draws `DIR/loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ringformer.errors import UserError

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PLOT_FILE = "loss.png"
# Every row the logger writes begins so (json.dumps keeps the key order it was given).
_ROW_START = b'{"step": '

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def matmul_params(model_cfg) -> int:
    """Weights that take part in a matmul for every token: projections, MLP and the LM head.

    The embedding lookup is a gather, not a matmul, so it is not counted; the LM head is
    counted once whether or not it is tied to the embedding.
    """
    d, n_layers, h, g = (int(model_cfg[k]) for k in ("dim", "n_layers", "n_heads", "n_kv_heads"))
    f, v = int(model_cfg["ffn_dim"]), int(model_cfg["vocab_size"])
    k = d // h
    per_layer = d * h * k + 2 * d * g * k + h * k * d + 3 * d * f  # wq, wk+wv, wo, SwiGLU
    return n_layers * per_layer + d * v


def flops_per_token(model_cfg, seq_len: int, *, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token; see docs/metrics.md.

    `6 * matmul_params` for the weight matmuls, plus attention scores and values:
    `12 * n_layers * seq_len * n_heads * head_dim` non-causal, half that causal.
    Recomputation under remat is not counted (this is model FLOPs, not hardware FLOPs).
    """
    n_layers, h = int(model_cfg["n_layers"]), int(model_cfg["n_heads"])
    attn_width = h * (int(model_cfg["dim"]) // h)
    attention = 12.0 * n_layers * seq_len * attn_width
    if causal:
        attention /= 2
    return 6.0 * matmul_params(model_cfg) + attention


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over `n_devices * peak` (per device)."""
    if peak <= 0 or n_devices <= 0:
        return float("nan")
    return tokens_per_sec * flops_per_token / (n_devices * peak)


@dataclasses.dataclass(frozen=True)
class Peak:
    """The per-device FLOP/s an MFU is against, and its origin (said beside every MFU)."""

    flops: float
    source: str

    def as_row(self) -> dict[str, Any]:
        return {"peak_flops": self.flops, "peak_flops_source": self.source}


def peak_flops(configured: float, dtype: str, devices: Sequence[Any] | None = None) -> Peak:
    """The peak for MFU: `train.peak_flops` if set; else the datasheet peak of the device
    kind in the model's dtype (`ringformer.train.hardware`); else, for CPUs and kinds the
    table lacks, the measured matmul rate (`measure_peak_flops`)."""
    if configured and configured > 0:
        return Peak(float(configured), "config: train.peak_flops")
    import jax

    from ringformer.train import hardware

    device = (list(devices) if devices is not None else jax.local_devices())[0]
    spec = hardware.device_spec(device.device_kind)
    if spec is not None:
        kind = "fp32" if hardware.peak_for_dtype(spec, dtype) == spec.fp32 != spec.bf16 else "bf16"
        return Peak(hardware.peak_for_dtype(spec, dtype),
                    f"table: {spec.name} dense {kind} (docs/metrics.md)")
    return Peak(measure_peak_flops(devices=devices),
                f"measured: float32 matmul on {device.device_kind}, all local devices at once")


def measure_peak_flops(*, n: int | None = None, dtype: Any = None, min_seconds: float = 0.25,
                       devices: Sequence[Any] | None = None) -> float:
    """Per-device matmul FLOP/s, measured with every local device multiplying at once.

    Used when `train.peak_flops == 0` (CPU runs). All devices run together because the
    virtual CPU devices share the same cores: timing one alone would credit each of them
    with the whole machine. The result is an achieved rate, below the datasheet peak, so MFU
    against it reads higher than against a vendor number. Default dtype float32.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = list(jax.local_devices() if devices is None else devices)
    dtype = jnp.float32 if dtype is None else dtype
    if n is None:
        n = 512 if devices[0].platform == "cpu" else 4096
    sharding = NamedSharding(Mesh(np.asarray(devices), ("d",)), PartitionSpec("d"))
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((len(devices), n, n), np.float32).astype(dtype), sharding)
    b = jax.device_put(rng.standard_normal((len(devices), n, n), np.float32).astype(dtype), sharding)
    matmul = jax.jit(lambda x, y: jnp.einsum("kij,kjl->kil", x, y), out_shardings=sharding)
    matmul(a, b).block_until_ready()  # compile and warm up outside the timing
    reps, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        out = None
        for _ in range(reps):
            out = matmul(a, b)
        out.block_until_ready()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or reps >= 1 << 12:
            break
        reps *= 2
    return 2.0 * n**3 * reps / elapsed


# ---------------------------------------------------------------------------------------------
# metrics.jsonl + TensorBoard


def _scalar(value: Any) -> int | float | str | None:
    """A JSON-safe number: ints stay ints; NaN/inf become null (JSON has no NaN). Strings
    (where a number came from) pass as they are, to metrics.jsonl only."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item"):  # numpy and jax scalars
        value = value.item()
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _parse_row(line: bytes) -> dict[str, Any] | None:
    """The metrics row on `line`, or None if it is not one (torn, edited, binary garbage)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        return None
    if isinstance(row, dict) and type(row.get("step")) is int:
        return row
    return None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of `DIR/metrics.jsonl`; lines that are not rows (a torn last line from a run
    killed mid-write, anything written by hand or by a disk error) are skipped."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = (_parse_row(line) for line in path.read_bytes().split(b"\n"))
    return [r for r in rows if r is not None]


class MetricsLogger:
    """Appends metric rows to `DIR/metrics.jsonl` and TensorBoard scalars to `DIR/tb/`.

    `log(step, {"loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_sec": ..., "mfu": ...})`
    writes one row; eval rows carry `eval_loss` and `eval_ppl`. Every row is flushed at once,
    so a killed run leaves at most one torn line. With `enabled=False` (processes other than
    0) nothing is created or written.

    Resume: pass `resume_step=k` when the run restarts from a checkpoint at step k. Rows with
    step > k, written by the killed run after that checkpoint, are dropped (the file is
    rewritten atomically) so the resumed run does not log them twice; TensorBoard is told
    to purge its events from step k+1 on. `resume_step=None` keeps every row. Lines that are
    not rows are kept as they are, with a warning (see `_trim`); only a torn last row goes.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._trim(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(Path(workdir) / TB_DIR), purge_step=purge, flush_secs=30)
        self._tb_errors: list[OSError] = []
        _guard_tb(self._tb, self._tb_errors)

    def _trim(self, resume_step: int | None) -> None:
        """Drop the rows after `resume_step` and a torn last row; keep every other line.

        Only what this logger wrote and will write again is dropped. A line that is not a
        row is not ours to judge (a note, a disk error's bytes): it stays, byte for byte, with
        a warning naming it; readers skip it.
        """
        if not self.path.exists():
            return
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror}",
                            "move it aside or use another --workdir") from e
        *lines, last = data.split(b"\n")
        # A run killed mid-write leaves the start of a row and no newline: the resumed run
        # logs that step again.
        torn = last.startswith(_ROW_START) and _parse_row(last) is None
        if last and not torn:
            lines.append(last)  # given the newline it lacked, so our next row starts a line
        kept, foreign = [], []
        for n, line in enumerate(lines, 1):
            row = _parse_row(line)
            if row is None:
                kept.append(line)
                if line.strip():
                    foreign.append(n)
            elif resume_step is None or row["step"] <= resume_step:
                kept.append(line)
        if foreign:
            where = ", ".join(map(str, foreign[:10])) + (", ..." if len(foreign) > 10 else "")
            log.warning("%s has lines that are not metrics rows (line %s); they are kept as they"
                        " are, and plots and tools skip them", self.path, where)
        clean = b"".join(line + b"\n" for line in kept)
        if clean == data:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_bytes(clean)
            os.replace(tmp, self.path)  # atomic: a kill here leaves the old or the new file whole
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot rewrite {self.path}: {e.strerror}",
                            "check free disk space and permissions") from e

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one row `{"step": step, **metrics}`; returns the row as written."""
        row: dict[str, Any] = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: one error line, not a traceback
            raise UserError(f"cannot write {self.path}: {e.strerror}",
                            "check free disk space and permissions") from e
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, int(step))
        self._raise_tb_error()
        return row

    def _raise_tb_error(self) -> None:
        if self._tb_errors:
            e = self._tb_errors[0]
            raise UserError(f"cannot write TensorBoard events in {self.path.parent / TB_DIR}:"
                            f" {e.strerror or e}", "check free disk space and permissions") from e

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self._file is None:
            return
        file, tb, self._file, self._tb = self._file, self._tb, None, None
        try:
            file.close()
            tb.close()
        except OSError as e:
            _abandon_tb(tb)
            raise UserError(f"cannot write the metrics of {self.path.parent}: {e.strerror}",
                            "check free disk space and permissions") from e
        self._raise_tb_error()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _guard_tb(tb, errors: list) -> None:
    """Make the TensorBoard writer record its write errors in `errors` instead of dying.

    tensorboardX writes from a worker thread; a failed flush (a full disk) killed that
    thread with a traceback, its bounded queue then filled, and the next `add_scalar`
    blocked forever: the trainer hung, deaf to SIGTERM. Guarded, the worker keeps draining
    and `MetricsLogger` reports the first error as one line. Uses tensorboardX internals;
    if they change, the writer is left as it was.
    """
    try:
        events = tb._get_file_writer().event_writer._ev_writer
        for name in ("write_event", "flush"):
            setattr(events, name, _recording(getattr(events, name), errors))
    except Exception:
        log.debug("could not guard the TensorBoard writer", exc_info=True)


def _recording(method, errors: list):
    def guarded(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OSError as e:
            errors.append(e)
            return None
    return guarded


def _abandon_tb(tb) -> None:
    """Stop a TensorBoard writer whose close failed (a full disk), without more output.

    Its close stops at the failed flush, leaving its worker thread running and its atexit
    hook to flush again at exit: two more tracebacks after the error line. Marked closed, the
    hook does nothing. Uses tensorboardX internals, each guarded.
    """
    for writer in list((getattr(tb, "all_writers", None) or {}).values()):
        events = getattr(writer, "event_writer", None)
        try:
            events._closed = True
            events._worker.stop()
        except Exception:  # best effort: the failure is being reported already
            log.debug("could not stop a TensorBoard writer", exc_info=True)


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True):
    """A tqdm bar over training steps (disabled on processes other than 0).

    The trainer updates it with `bar.update(n)` and `bar.set_postfix(loss=..., tok_s=...)`.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def plot_metrics(workdir: str | os.PathLike) -> Path:
    """Draw train loss and eval loss against step into `DIR/loss.png`; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(workdir)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    ax = fig.add_subplot()
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    out = Path(workdir) / PLOT_FILE
    fig.savefig(out)
    return out
