"""The run directory: checked before use and locked so two trainers never share it.

`prepare_workdir(path)` refuses a path that is a regular file and creates the directory
otherwise. `WorkdirLock(workdir)` holds an exclusive `fcntl.flock` on `DIR/.lock` for the
life of a run. flock belongs to the open file, so the kernel drops it when the process
dies however it dies (SIGKILL included): a stale lock from a crashed run never blocks the
next one, and the lock file itself is never deleted (deleting it would let a third process
lock a fresh inode while a second still holds the old one).

In a multi-process run only process 0 should take the lock: every process of one run
shares the workdir, and a second run is refused when its process 0 finds the lock held.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from ringformer.errors import CheckpointError, UserError

LOCK_NAME = ".lock"


def prepare_workdir(path: str | os.PathLike) -> Path:
    """Return `path` as a directory that exists; UserError if it is a file or cannot be made."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"workdir {p} is a regular file, not a directory",
                        "pass a directory path to --workdir (it is created if missing)")
    for attempt in range(3):
        try:
            p.mkdir(parents=True, exist_ok=True)
            break
        except (FileExistsError, NotADirectoryError) as e:
            # A peer process of a multi-process run may make and remove the same directory
            # between mkdir's attempt and its is_dir check: blame a parent only if one is a
            # file, else try again.
            if attempt == 2 or any(q.exists() and not q.is_dir() for q in (p, *p.parents)):
                raise UserError(f"cannot create workdir {p}: a parent path is a file",
                                "choose a --workdir whose parents are directories") from e
        except OSError as e:
            raise UserError(f"cannot create workdir {p}: {e.strerror}",
                            "choose a --workdir you can write to") from e
    return p


def require_checkpoints(workdir: str | os.PathLike, fix: str) -> None:
    """Refuse a `workdir` without a `checkpoints/` directory, saying which of the three it is.

    Checked before a Checkpointer is built: it creates `checkpoints/` (and the workdir) when
    missing, which would leave a directory behind that looks like a run, or fail on a file
    with a traceback.
    """
    p = Path(workdir)
    if not (p / "checkpoints").is_dir():
        raise CheckpointError(f"no checkpoints in {workdir}" if p.is_dir()
                              else f"workdir {workdir} is not a directory" if p.exists()
                              else f"workdir {workdir} does not exist", fix)


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first: what `prepare_workdir`
    is about to create, so a failed first run can take exactly that back."""
    p = Path(path).absolute()
    return [d for d in (p, *p.parents) if not d.exists()]


def remove_unused_workdir(created: list[Path]) -> bool:
    """Undo `prepare_workdir` for a run that failed before writing anything.

    `created` is `missing_dirs(workdir)` from before the run: the workdir, then parents it
    created. The workdir goes if it holds no file but the lock file (empty directories, such
    as the `checkpoints/` a checkpoint manager makes on start, count as nothing), then each
    created parent that is empty. True if the workdir was removed. Call it while still holding
    the lock: then no other process holds the lock file being unlinked, so the rule above
    (never delete a lock file someone may hold) still stands; one that opens it after the
    unlink creates a new file, the directory is no longer empty and stays.
    """
    if not created:
        return False
    workdir, *parents = created
    try:
        dirs = []
        for root, subdirs, files in os.walk(workdir):
            if set(files) - ({LOCK_NAME} if Path(root) == workdir else set()):
                return False
            dirs.extend(Path(root) / d for d in subdirs)
        (workdir / LOCK_NAME).unlink(missing_ok=True)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            d.rmdir()
        workdir.rmdir()
        for d in parents:
            d.rmdir()
    except OSError:  # something appeared meanwhile: leave it and everything above it
        return not workdir.exists()
    return True


class WorkdirLock:
    """Exclusive lock on `DIR/.lock`, as a context manager (or `acquire()` / `release()`).

    A second holder, in this process or another, gets UserError naming the pid that holds it.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot open lock file {self.path}: {e.strerror}",
                            "check that --workdir is a writable directory") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"workdir {self.workdir} is in use by another run (pid {holder})",
                                "wait for it to finish or use another --workdir") from None
            raise UserError(f"cannot lock {self.path}: {e.strerror}",
                            "use a --workdir on a filesystem that supports file locks") from e
        # Record who holds it, for the message a second run prints; written after locking so
        # the content always names the current holder.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release must not leak the fd
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
