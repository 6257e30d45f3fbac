"""The COMMITTED marker on its own: a step directory is whole exactly when its files match the
table written after orbax finished. (End to end, with orbax: tests/train/test_checkpoint.py.)"""

import json
from pathlib import Path

import pytest

from ringformer.train.checkpoint_integrity import MARKER, file_table, why_invalid, write_marker


@pytest.fixture
def step_dir(tmp_path) -> Path:
    d = tmp_path / "7"
    (d / "state").mkdir(parents=True)
    (d / "state" / "array").write_bytes(bytes(range(256)) * 8)
    (d / "data").write_text('{"batches": 7}')
    return d


def test_a_marked_directory_is_whole_and_the_marker_lists_every_other_file(step_dir):
    assert "no COMMITTED marker" in why_invalid(step_dir)
    write_marker(step_dir, 7)
    marker = json.loads((step_dir / MARKER).read_text())
    assert marker["step"] == 7 and sorted(marker["files"]) == ["data", "state/array"]
    assert marker["files"] == file_table(step_dir)
    assert why_invalid(step_dir) is None
    assert not (step_dir / (MARKER + ".tmp")).exists()


def test_each_kind_of_damage_is_named(step_dir):
    write_marker(step_dir, 7)
    array = step_dir / "state" / "array"
    good = array.read_bytes()

    array.write_bytes(good[:-1])
    assert "has 2047 bytes where 2048 were written" in why_invalid(step_dir)

    array.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    assert "does not match its checksum" in why_invalid(step_dir)
    # Sizes only: a flipped byte passes, which is the documented trade for huge checkpoints.
    assert why_invalid(step_dir, verify_checksums=False) is None

    array.unlink()
    assert "file state/array is missing" in why_invalid(step_dir)

    (step_dir / MARKER).write_text("{not json")
    assert "unreadable" in why_invalid(step_dir)
