"""FLOP counting against hand counts and the paper's formula; the metric files."""

import json
import logging
import math
import struct
import time

import pytest
from tensorboardX.proto import event_pb2

from ringformer.errors import UserError
from ringformer.train.metrics import (
    MetricsLogger,
    flops_per_token,
    matmul_params,
    measure_peak_flops,
    mfu,
    plot_metrics,
    read_metrics,
)

TINY = dict(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16)


def test_flops_per_token_hand_count():
    # head_dim 4; per layer wq 8*2*4=64, wk 8*1*4=32, wv 32, wo 64, SwiGLU 3*8*16=384 -> 576;
    # two layers 1152, LM head 8*10=80 -> 1232 matmul weights
    assert matmul_params(TINY) == 1232
    # attention, seq 32: 12 * 2 layers * 32 * 8 = 6144 non-causal, 3072 causal
    assert flops_per_token(TINY, 32, causal=False) == 6 * 1232 + 6144
    assert flops_per_token(TINY, 32) == 6 * 1232 + 3072


def test_matches_ring_attention_paper_formula_times_three():
    # The paper counts a forward pass per sequence: (24 b s h^2 + 4 b s^2 h) * layers, with
    # MHA and a 4h two-matrix MLP. A SwiGLU of width 8h/3 has the same 8h^2 weights, so our
    # non-causal count without the LM head is exactly 3x (forward + backward) per token.
    h, s, layers, b = 48, 256, 3, 2
    cfg = dict(vocab_size=7, dim=h, n_layers=layers, n_heads=4, n_kv_heads=4, ffn_dim=8 * h // 3)
    paper_per_token = (24 * b * s * h**2 + 4 * b * s**2 * h) * layers / (b * s)
    ours = flops_per_token(cfg, s, causal=False) - 6 * h * cfg["vocab_size"]
    assert ours == pytest.approx(3 * paper_per_token, rel=1e-12)


def test_mfu_arithmetic():
    assert mfu(1000.0, 6e9, 8, 1e12) == pytest.approx(1000 * 6e9 / 8e12)
    assert math.isnan(mfu(1000.0, 6e9, 8, 0.0))


def test_measure_peak_flops_is_a_positive_rate():
    peak = measure_peak_flops(n=64, min_seconds=0.01)
    assert math.isfinite(peak) and peak > 0


def _tb_scalars(tb_dir):
    out = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as log:
        log.log(1, {"loss": 5.5, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_sec": 100.0, "mfu": 0.25})
        log.log(2, {"loss": float("nan"), "lr": 2e-4, "grad_norm": float("inf"),
                    "tokens_per_sec": 110.0, "mfu": 0.3, "skipped_steps": 1})
        log.log(2, {"eval_loss": 4.0, "eval_ppl": math.exp(4.0)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows[0] == {"step": 1, "loss": 5.5, "lr": 1e-4, "grad_norm": 2.0,
                       "tokens_per_sec": 100.0, "mfu": 0.25}
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None and rows[1]["skipped_steps"] == 1
    assert rows[2] == {"step": 2, "eval_loss": 4.0, "eval_ppl": pytest.approx(math.exp(4.0))}
    scalars = _tb_scalars(tmp_path / "tb")
    assert ("loss", 1, 5.5) in scalars
    assert ("eval_loss", 2, 4.0) in scalars
    assert not any(tag == "loss" and step == 2 for tag, step, _ in scalars)  # NaN not sent


def test_disabled_logger_creates_nothing(tmp_path):
    with MetricsLogger(tmp_path, enabled=False) as log:
        assert log.log(3, {"loss": 1.0}) == {"step": 3, "loss": 1.0}
    assert list(tmp_path.iterdir()) == []


def test_resume_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(10 - step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    with MetricsLogger(tmp_path, enabled=True, resume_step=3) as log:
        log.log(4, {"loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 0.5)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_keeps_lines_that_are_not_rows_byte_for_byte(tmp_path, caplog):
    """Binary garbage, a hand-written note and a row whose step is not a number are not the
    logger's to drop: a resume keeps each where it was and says so; readers skip them."""
    with MetricsLogger(tmp_path, enabled=True) as log:
        for step in range(1, 5):
            log.log(step, {"loss": float(10 - step)})
    path = tmp_path / "metrics.jsonl"
    rows = path.read_bytes().splitlines(keepends=True)
    foreign = [b"\xff\xfe garbage\n", b"# lr too high, restarted\n", b'{"step": "x"}\n']
    path.write_bytes(b"".join([rows[0], foreign[0], *rows[1:3], foreign[1], rows[3], foreign[2]]))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    with caplog.at_level(logging.WARNING, logger="ringformer.train.metrics"), \
            MetricsLogger(tmp_path, enabled=True, resume_step=2) as log:
        log.log(3, {"loss": 0.5})
    assert path.read_bytes() == b"".join([rows[0], foreign[0], rows[1], foreign[1], foreign[2],
                                          b'{"step": 3, "loss": 0.5}\n'])
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 0.5)]
    assert "not metrics rows (line 2, 5, 7)" in caplog.text


def test_last_line_without_newline_that_is_not_a_row_is_kept(tmp_path):
    """Only the start of one of our rows is a torn write; other text is kept, ended with a
    newline so the next row starts a line of its own."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\nnotes, no newline')
    with MetricsLogger(tmp_path, enabled=True, resume_step=1) as log:
        log.log(2, {"loss": 1.0})
    assert path.read_bytes() == b'{"step": 1, "loss": 2.0}\nnotes, no newline\n{"step": 2, "loss": 1.0}\n'


def test_unreadable_metrics_file_is_a_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match=r"cannot read .*metrics\.jsonl: Is a directory"):
        MetricsLogger(tmp_path, enabled=True, resume_step=0)
    assert (tmp_path / "metrics.jsonl").is_dir()


def test_plot_metrics_writes_png(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as log:
        for step in range(1, 4):
            log.log(step, {"loss": 3.0 / step})
        log.log(3, {"eval_loss": 1.2, "eval_ppl": math.exp(1.2)})
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ the peak table


class _FakeDevice:
    platform = "gpu"

    def __init__(self, kind: str):
        self.device_kind = kind


@pytest.mark.parametrize("kind,dtype,flops,name", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12, "H100 SXM"),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7e12, "H100 SXM"),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12, "H100 PCIe"),
    ("NVIDIA H200", "bfloat16", 989.4e12, "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12, "A100 40GB"),
    ("NVIDIA L4", "bfloat16", 121e12, "L4"),
    ("TPU v4", "bfloat16", 275e12, "TPU v4"),
    ("TPU v5 lite", "bfloat16", 197e12, "TPU v5e"),
    ("TPU v5", "float32", 459e12, "TPU v5p"),
    ("TPU v6 lite", "bfloat16", 918e12, "TPU v6e"),
])
def test_a_known_device_kind_uses_its_table_entry(kind, dtype, flops, name):
    from ringformer.train.metrics import peak_flops

    peak = peak_flops(0.0, dtype, devices=[_FakeDevice(kind)])
    assert peak.flops == flops
    assert peak.source.startswith(f"table: {name} dense")


def test_the_configured_peak_wins_and_unknown_kinds_are_measured(monkeypatch):
    from ringformer.train import hardware, metrics

    assert metrics.peak_flops(5e12, "bfloat16", devices=[_FakeDevice("TPU v4")]) == \
        metrics.Peak(5e12, "config: train.peak_flops")
    assert hardware.device_spec("NVIDIA L40S") is None  # not an L4
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda devices=None: 7.0)
    peak = metrics.peak_flops(0.0, "float32", devices=[_FakeDevice("cpu")])
    assert peak.flops == 7.0 and peak.source.startswith("measured:")


def test_a_full_disk_under_tensorboard_is_one_error_not_a_hang(tmp_path, monkeypatch):
    """A failed TensorBoard flush killed tensorboardX's writer thread (a traceback on stderr);
    its queue then filled and `add_scalar` blocked forever: the trainer hung on a full disk."""
    import errno
    import threading

    from tensorboardX import record_writer

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger = MetricsLogger(tmp_path, enabled=True)
    # The worker flushes every flush_secs (30 s): at once here, so the test takes seconds.
    worker = logger._tb._get_file_writer().event_writer._worker
    worker._flush_secs = 0
    # The worker may already have flushed the file's first event and scheduled its next
    # flush 30 s ahead (a race with this thread): bring that flush forward too.
    worker._next_flush_time = 0
    monkeypatch.setattr(record_writer.RecordWriter, "flush", full)
    raised = []

    def log_many():
        # Log until the writer's failed flush surfaces (it runs on tensorboardX's own thread,
        # so a fixed number of rows can all be written before it has failed once).
        deadline = time.monotonic() + 20
        try:
            step = 0
            while time.monotonic() < deadline:
                step += 1
                logger.log(step, {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0})
                time.sleep(0.01)
        except UserError as e:
            raised.append(e)

    t = threading.Thread(target=log_many, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "logging blocked on the dead TensorBoard writer"
    assert raised and f"cannot write TensorBoard events in {tmp_path / 'tb'}: No space left" \
        in str(raised[0])
    with pytest.raises(UserError, match="No space left on device"):
        logger.close()
