"""ringformer.data.sources: every way reading a data file can fail is one DataError naming it."""

import os
import re
import signal
import threading

import pytest

from ringformer.data import sources as src
from ringformer.errors import DataError


def records(path):
    return list(src.iter_records(src.resolve_files(str(path))))


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    """The issue's serious case: a FIFO as a data file hung the trainer forever (no writer
    ever comes). It is refused by its type, without opening it (an open would block)."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    timer = threading.Timer(20, lambda: os.kill(os.getpid(), signal.SIGALRM))  # never hang CI
    timer.start()
    try:
        with pytest.raises(DataError, match=re.escape(f"data file {fifo} is a FIFO (named pipe), "
                                                      "not a regular file")):
            src.resolve_files(str(fifo))
        with pytest.raises(DataError, match="is a FIFO"):  # also when found in a directory
            src.resolve_files(str(tmp_path))
    finally:
        timer.cancel()


def test_symlink_loops_and_dangling_links_name_the_file(tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=re.escape(f"data file {loop} is a link to nothing")):
        src.resolve_files(str(loop))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl").symlink_to(d / "a.jsonl")
    with pytest.raises(DataError, match=r"cannot read data file .*a\.jsonl: Too many levels"):
        src.resolve_files(str(d))


@pytest.mark.parametrize("content,message", [
    (b"[" * 200_000, ":1: JSON nested too deeply to parse"),
    (b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n", ":1: unreadable JSON value (Exceeds the limit"),
    (b'{"text": "ok"}\n' + b'{"a": ' * 100_000 + b"\n", ":2: JSON nested too deeply to parse"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_pathological_json_is_one_error_naming_the_line(tmp_path, content, message, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}{message}")):
        records(path)


def test_os_errors_while_reading_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n')
    real_open = open

    def failing_open(p, *a, **kw):
        if str(p) == str(path):
            raise OSError(5, "Input/output error")
        return real_open(p, *a, **kw)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(DataError, match=re.escape(f"cannot read data file {path}: "
                                                  "Input/output error")):
        records(path)
