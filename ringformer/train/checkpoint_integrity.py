"""Whether a checkpoint step directory on disk is whole: the COMMITTED marker and its file table.

How a cut-short write looks, and how we tell (verified on orbax-checkpoint 0.12.8, local
filesystem): orbax writes into `N.orbax-checkpoint-tmp/` and, once every file is written,
adds `commit_success.txt` and renames the directory to `N/`. A process killed before the
rename leaves only the tmp directory, which orbax never lists as a step (and which a later
save of step N replaces). The rename is atomic, so `N/` appearing means orbax finished.
That alone does not catch files damaged afterwards (disk errors, a partial copy or rsync
of the workdir, a truncated file), so once orbax has finished, `Checkpointer` writes
`N/COMMITTED`: a JSON table of every file in `N/` with its size and CRC-32. A step counts as
valid only when COMMITTED exists and every file listed has its size and checksum. A kill
between orbax's rename and COMMITTED leaves a complete orbax directory without the marker:
it is treated as not committed (conservatively; the previous checkpoint is used).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

MARKER = "COMMITTED"
_CHUNK = 1 << 24


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_table(step_dir: Path) -> dict[str, list[int]]:
    """{path relative to step_dir: [size, CRC-32]} of every file but the marker itself."""
    table = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            rel = p.relative_to(step_dir).as_posix()
            if rel in (MARKER, MARKER + ".tmp"):
                continue
            table[rel] = [p.stat().st_size, crc32(p)]
    return table


def write_marker(step_dir: Path, step: int) -> None:
    """Declare `step_dir` whole: called once orbax has finished writing it."""
    _write_json_atomic(step_dir / MARKER, {"format": 1, "step": step, "files": file_table(step_dir)})


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def why_invalid(step_dir: Path, *, verify_checksums: bool = True) -> str | None:
    """None if the files of `step_dir` match its COMMITTED table, else the reason.

    `verify_checksums=False` compares sizes only (faster for huge checkpoints, still catches
    truncation).
    """
    marker = step_dir / MARKER
    if not marker.is_file():
        return "it has no COMMITTED marker, so its write never finished (killed mid-save?)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its COMMITTED marker is unreadable"
    for rel, (size, _) in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} is missing"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes where {size} were written (truncated?)"
    if verify_checksums:
        for rel, (_, crc) in files.items():
            if crc32(step_dir / rel) != crc:
                return f"file {rel} does not match its checksum (damaged)"
    return None


def is_own_checkpoint(step_dir: Path, step: int) -> bool:
    """Whether `step_dir` is provably a checkpoint this code committed as `step`: a real
    directory (not a link) whose COMMITTED marker names `step` and lists exactly the files
    in it, at their sizes. Only such a directory may be deleted: a directory a user named
    with a number, or added files to, is not ours to delete."""
    if step_dir.is_symlink() or not step_dir.is_dir():
        return False
    try:
        marker = json.loads((step_dir / MARKER).read_text())
        files = {rel: int(size) for rel, (size, _) in marker["files"].items()}
        # orbax always writes files: an empty table is a marker someone else made
        if marker.get("format") != 1 or marker.get("step") != step or not files:
            return False
        found = {}
        for root, dirs, names in os.walk(step_dir):
            if any(Path(root, d).is_symlink() for d in dirs):
                return False
            for name in names:
                rel = (Path(root) / name).relative_to(step_dir).as_posix()
                if rel not in (MARKER, MARKER + ".tmp"):
                    found[rel] = (Path(root) / name).lstat().st_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return found == files
