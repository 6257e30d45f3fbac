"""Checkpoints of the train state in `DIR/checkpoints/`: orbax underneath, integrity on top.

A checkpoint at step N is the orbax step directory `DIR/checkpoints/N/` with three items:
`state` (any pytree of jax arrays; the trainer's params, opt_state, step, rng), `data` (the
data iterator's JSON state) and `config` (the run's config as JSON). Arrays restore straight
onto the shardings of the `abstract_state` the caller passes, so a checkpoint written on one
mesh restores onto another.

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

Restoring never changes anything on disk. `latest_valid_step()` and `restore(None, ...)`
walk from the newest step down, warn about each step they skip and why, and raise
CheckpointError if steps exist but none is valid (a run must not silently start over).
Disk changes happen only when a save succeeds: keep-N deletes old steps only after the new
one is committed (orbax's own `max_to_keep` would delete before our marker exists), and a
leftover invalid directory at a step being saved again is moved to
`DIR/checkpoints/moved_aside/` rather than deleted.

Multi-process: every process calls every method (orbax saves collectively); only process 0
writes markers, moves or deletes directories. The filesystem must be shared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ringformer.errors import CheckpointError
from ringformer.train import orbax_failures

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = "COMMITTED"
MOVED_ASIDE = "moved_aside"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's AtomicRenameTemporaryPath naming
_CHUNK = 1 << 24


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_table(step_dir: Path) -> dict[str, list[int]]:
    table = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            rel = p.relative_to(step_dir).as_posix()
            if rel in (MARKER, MARKER + ".tmp"):
                continue
            table[rel] = [p.stat().st_size, _crc32(p)]
    return table


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


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ringformer.train.checkpoint.{name}")


def _agree(value: int) -> int:
    """Process 0's `value`, on every process.

    Decisions read from the shared filesystem must be the same everywhere, or the collective
    save or restore that follows deadlocks: another process can look at a step before process
    0's background thread has written its COMMITTED marker (or through a stale NFS cache).
    """
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _leaf_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _stored_signature(x) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) as orbax stores a leaf: typed PRNG keys are stored as their key data."""
    shape, dtype = tuple(x.shape), x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        shape, dtype = tuple(data.shape), data.dtype
    return shape, str(jax.numpy.dtype(dtype))


class Checkpointer:
    """Save and restore the train state in `workdir/checkpoints/`, keeping the newest `keep`.

    `async_save=True` returns from `save` once arrays are copied off the devices; orbax
    writes in the background, and a background thread then writes the COMMITTED marker and
    prunes old steps. Call `wait()` (or `close()`) before the process exits on purpose.
    A failed save is raised once, as CheckpointError, by the next call that waits for it
    (`save`, `wait`, `close`, ...); after it the checkpointer only restores and closes.
    `verify_checksums=False` checks only file sizes at restore (faster for huge checkpoints,
    still catches truncation).
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool = True,
                 verify_checksums: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least one checkpoint")
        # Orbax needs an absolute path (a relative --workdir such as runs/tiny is normal).
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        # Orbax accepts a file here and fails only in its background save threads; checked
        # now, the run stops before anything is compiled.
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is a file, not a directory of checkpoints",
                                  "move that file aside (the run keeps its checkpoints in a"
                                  " directory of that name) or use another --workdir")
        self.keep = keep
        self.async_save = async_save
        self.verify_checksums = verify_checksums
        self._primary = jax.process_index() == 0
        self._manager = ocp.CheckpointManager(
            self.directory,
            # handlers named up front, so metadata of steps saved by another process is readable
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # we prune, after our marker is written
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=False,  # nothing on disk changes until a save succeeds
            ),
        )
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._held: orbax_failures.HeldOrbaxErrors | None = None
        self._operation_id: str | None = None
        # After a failed save orbax's manager re-raises that failure from every wait; it has
        # been reported once, so the manager is no longer waited on.
        self._failed = False
        self._verdicts: dict[int, str | None] = {}  # step -> None if valid, else why not
        self._warned: set[int] = set()
        self.skipped: dict[int, str] = {}  # steps passed over by the last fallback, and why

    # -- what is on disk ------------------------------------------------------------------

    def _step_dirs(self) -> dict[int, Path]:
        if not self.directory.is_dir():
            return {}
        return {int(p.name): p for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()}

    def all_steps(self) -> list[int]:
        """Every step directory orbax finished writing, valid or not, oldest first."""
        return sorted(self._step_dirs())

    def _check(self, step: int) -> str | None:
        """None if step's files match its COMMITTED table, else the reason; cached per step."""
        if step in self._verdicts:
            return self._verdicts[step]
        step_dir = self.directory / str(step)
        reason = self._check_uncached(step_dir)
        self._verdicts[step] = reason
        return reason

    def _check_uncached(self, step_dir: Path) -> str | None:
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
        if self.verify_checksums:
            for rel, (_, crc) in files.items():
                if _crc32(step_dir / rel) != crc:
                    return f"file {rel} does not match its checksum (damaged)"
        return None

    def _skip(self, step: int, reason: str) -> None:
        self.skipped[step] = reason
        if step not in self._warned:
            self._warned.add(step)
            log.warning("checkpoint step %d in %s is not usable: %s; trying an older one",
                        step, self.directory, reason)

    def _no_valid_checkpoint(self) -> CheckpointError:
        why = "; ".join(f"step {s}: {r}" for s, r in sorted(self.skipped.items(), reverse=True))
        return CheckpointError(
            f"no valid checkpoint in {self.directory} ({why})",
            f"nothing was deleted; to start from scratch move {self.directory} aside"
            " or use a fresh --workdir")

    def latest_valid_step(self) -> int | None:
        """Newest step that passes the integrity check; None if there are no checkpoints.

        Newer invalid steps are skipped with a warning. Raises CheckpointError if step
        directories exist but none is valid.
        """
        self._finish_background()
        error, found = None, -1
        try:
            found = self._latest_valid_step_here()
        except CheckpointError as e:
            error, found = e, -2
        agreed = _agree(-1 if found is None else found)
        if agreed == -2:
            raise error or CheckpointError(f"no valid checkpoint in {self.directory}",
                                           "see process 0's message")
        if agreed >= 0:
            self._verdicts[agreed] = None  # process 0 checked it; its view is the one used
        return None if agreed == -1 else agreed

    def _latest_valid_step_here(self) -> int | None:
        steps = sorted(self._step_dirs(), reverse=True)
        if not steps:
            return None
        self.skipped = {}
        for step in steps:
            reason = self._check(step)
            if reason is None:
                return step
            self._skip(step, reason)
        raise self._no_valid_checkpoint()

    # -- save -----------------------------------------------------------------------------

    def save(self, step: int, state_pytree: Any, *, data_state: dict, config_json: dict,
             force: bool = False) -> bool:
        """Save `state_pytree` (+ data iterator state and config) as step `step`.

        Returns False without writing if a valid checkpoint of this step already exists
        (e.g. the final save lands on a `save_every` step); `force=True` replaces it.
        A directory at this step that is not valid (left by a killed run) is moved to
        `checkpoints/moved_aside/` first. Raises CheckpointError if the previous
        background save failed.
        """
        self._finish_background()
        step = int(step)
        replaced = None
        reason = self._check(step) if step in self._step_dirs() else None
        # 0: no such step, 1: a valid one, 2: an invalid one (process 0's view, see _agree)
        there = _agree(0 if step not in self._step_dirs() else 1 if reason is None else 2)
        if there:
            if there == 1 and not force:
                self._verdicts[step] = None
                log.info("checkpoint step %d already exists and is valid; not saving again", step)
                return False
            if self._primary:
                replaced = self._move_aside(step, "replaced" if there == 1 else "invalid", reason)
            _sync(f"moved_aside_{step}")
        self._verdicts.pop(step, None)
        self._manager.reload()  # our own moves and deletions are invisible to its step cache
        self._held = orbax_failures.HeldOrbaxErrors()
        logging.getLogger("absl").addFilter(self._held)
        try:
            self._manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_pytree),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_json),
            ))
        except Exception as e:
            self._thread_error = e
        self._operation_id = orbax_failures.current_operation_id()
        if self._thread_error is not None:
            self._orbax_failed()
            self._finish_background()  # raises it, as CheckpointError
        if self.async_save:
            self._thread = threading.Thread(target=self._commit_in_background, args=(step, replaced),
                                            name=f"ringformer-commit-{step}")
            self._thread.start()
        else:
            try:
                self._commit(step, replaced)
            except Exception as e:
                self._thread_error = e
            self._finish_background()  # reported as a failed background save would be
        return True

    def _move_aside(self, step: int, kind: str, reason: str | None) -> Path:
        dest_dir = self.directory / MOVED_ASIDE
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{step}.{kind}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        os.rename(self.directory / str(step), dest)
        if kind == "invalid":
            log.warning("checkpoint step %d was not valid (%s); moved it to %s before saving"
                        " step %d again (delete it when you no longer need it)", step, reason, dest, step)
        return dest

    def _commit_in_background(self, step: int, replaced: Path | None) -> None:
        try:
            self._commit(step, replaced)
        except BaseException as e:  # handed to the main thread at the next call
            self._thread_error = e

    def _commit(self, step: int, replaced: Path | None) -> None:
        try:
            self._manager.wait_until_finished()  # raises if orbax's write failed
        except Exception:
            self._orbax_failed()
            raise
        if not self._primary:
            return
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise CheckpointError(f"orbax did not produce {step_dir}",
                                  "check free disk space and permissions")
        _write_json_atomic(step_dir / MARKER, {"format": 1, "step": step, "files": _file_table(step_dir)})
        self._verdicts[step] = None
        if replaced is not None and ".replaced." in replaced.name:
            shutil.rmtree(replaced)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Keep the newest `keep` committed steps up to `newest`; delete older step dirs.

        Steps above `newest` (left by a run that went further before it was killed) are
        not touched here. Dead orbax tmp dirs below `newest` are removed too.
        """
        dirs = self._step_dirs()
        committed = sorted((s for s, p in dirs.items() if s <= newest and (p / MARKER).is_file()),
                           reverse=True)
        if len(committed) <= self.keep:
            cutoff = None
        else:
            cutoff = committed[self.keep - 1]
        for s, p in dirs.items():
            if cutoff is not None and s < cutoff:
                (p / MARKER).unlink(missing_ok=True)  # first, so a half-deleted dir is never valid
                shutil.rmtree(p)
                self._verdicts.pop(s, None)
        for p in self.directory.glob(f"*{TMP_SUFFIX}*"):
            head = p.name.split(TMP_SUFFIX)[0]
            if head.isdigit() and int(head) < newest and p.is_dir():
                shutil.rmtree(p)

    def _orbax_failed(self) -> None:
        self._failed = True
        orbax_failures.release_threads(self._operation_id)

    def _finish_background(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._show_held_records()
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: {err!r}",
                                  "check free disk space and permissions") from err

    def _show_held_records(self) -> None:
        if self._held is None:
            return
        held, self._held = self._held, None
        logging.getLogger("absl").removeFilter(held)
        for record in held.held:
            if self._failed:
                log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            else:
                logging.getLogger(record.name).handle(record)

    def wait(self) -> None:
        """Block until the last save is written and committed; raises if it failed."""
        self._finish_background()
        if not self._failed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            # After a failed save orbax's manager is abandoned, not closed: closing waits for
            # the save again and re-raises its failure over the one already reported.
            if not self._failed:
                self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore --------------------------------------------------------------------------

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Return `(state, data_state, config_json)` from `step`, or the newest valid step.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set; arrays
        are read straight onto those shardings. With `step=None`, invalid newer steps are
        skipped with a warning. Raises CheckpointError when there is no usable checkpoint,
        when an explicit `step` is not valid, or when the stored tree or shapes differ from
        `abstract_state` (a different model config).
        """
        self._finish_background()
        dirs = self._step_dirs()
        if step is not None:
            step = int(step)
            if step not in dirs:
                raise CheckpointError(f"there is no checkpoint of step {step} in {self.directory}",
                                      f"choose one of {sorted(dirs) or 'none'}")
            reason = self._check(step)
            if reason is not None:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is not usable: {reason}",
                                      "restore another step, or none to use the newest valid one")
            return self._restore_one(step, abstract_state)
        if not dirs:
            raise CheckpointError(f"there is no checkpoint in {self.directory}",
                                  "train first, or point --workdir at a run that saved one")
        self.skipped = {}
        for s in sorted(dirs, reverse=True):
            reason = self._check(s)
            if reason is None:
                try:
                    saved = self._saved_signature(s)
                except CheckpointError as e:
                    reason = e.what
                else:
                    # A mismatch is not damage: older steps come from the same config, so stop.
                    self._check_compatible(s, saved, abstract_state)
                    try:
                        return self._read(s, abstract_state)
                    except CheckpointError as e:
                        reason = e.what
            self._skip(s, reason)
        raise self._no_valid_checkpoint()

    def read_json(self, step: int) -> tuple[dict, dict]:
        """`(data_state, config_json)` of a valid step, without reading any arrays.

        Lets the trainer compare the stored config with its own before building the
        abstract state, for a friendlier message than a shape mismatch.
        """
        self._finish_background()
        reason = self._check(int(step)) if int(step) in self._step_dirs() else "it does not exist"
        if reason is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is not usable: {reason}",
                                  "choose another step")
        self._manager.reload()
        out = self._manager.restore(int(step), args=ocp.args.Composite(
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return dict(out["data"] or {}), dict(out["config"] or {})

    def _restore_one(self, step: int, abstract_state: Any):
        self._check_compatible(step, self._saved_signature(step), abstract_state)
        return self._read(step, abstract_state)

    def _read(self, step: int, abstract_state: Any):
        self._manager.reload()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # files passed the integrity check but orbax cannot read them
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: {e}",
                                  "restore another step") from e
        return out["state"], dict(out["data"] or {}), dict(out["config"] or {})

    def _saved_signature(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{leaf name: (shape, dtype)} of the stored state, from orbax's metadata."""
        try:
            meta = self._manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has unreadable metadata: {e}",
                                  "restore another step") from e
        tree = getattr(meta, "tree", meta)
        if tree is None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has no state metadata",
                                  "restore another step")
        return {_leaf_name(p): (tuple(x.shape), str(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}

    def _check_compatible(self, step: int, saved: dict, abstract_state: Any) -> None:
        wanted = {_leaf_name(p): _stored_signature(x)
                  for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}

        def order(names):  # parameters first: they are what a model config changes
            return sorted(names, key=lambda n: (not n.startswith("params"), n))

        problems = [f"{n} is not in the checkpoint" for n in order(wanted.keys() - saved.keys())]
        problems += [f"{n} is in the checkpoint but not in this run"
                     for n in order(saved.keys() - wanted.keys())]
        for n in order(wanted.keys() & saved.keys()):
            (s_shape, s_dtype), (w_shape, w_dtype) = saved[n], wanted[n]
            if s_shape != w_shape:
                problems.append(f"{n} has shape {s_shape} in the checkpoint but {w_shape} in this run")
            elif s_dtype != w_dtype:
                problems.append(f"{n} is {s_dtype} in the checkpoint but {w_dtype} in this run")
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            # Only optimizer leaves differ: the model matches, optim.* (e.g. clip_norm) changed.
            what, fix = ("optimizer", "resume with the run's optim settings") if all(
                p.startswith("opt_state") for p in problems) else ("model", "run with the config "
                                                                   "the checkpoint was written with")
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written by a different {what} config:"
                f" {'; '.join(problems[:3])}{more}", f"{fix}, or use a fresh --workdir")
