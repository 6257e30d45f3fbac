"""Checkpoints of a run in `DIR/checkpoints/`: orbax underneath, integrity on top.

A checkpoint at step N is the orbax step directory `DIR/checkpoints/N/`, with three items:
- `state`: the train state pytree the caller passes; the trainer's `TrainState` is `step`
  (int32), `params` and `opt_state` (optax's moments and counts). No RNG state: the step
  function draws none, and the data order comes from the seed and the position below.
- `data`: JSON, the trainer's progress: the data iterator's position (`seed`, `batches`, and
  `epoch`/`position` for people reading it), the metric window (`log_window`: loss and grad
  norm of each step since the last log row) and `skipped_steps` (non-finite steps skipped).
- `config`: JSON, the run's whole config (what `restore_run` rebuilds the model from).
Once orbax has finished, `N/COMMITTED` adds a table of every file's size and CRC-32
(checkpoint_integrity.py); a step without it, or whose files differ from it, is not valid.
Arrays restore straight onto the shardings of the `abstract_state` the caller passes, so a
checkpoint written on one mesh restores onto another; a tree of another model or optimizer
config is refused leaf by leaf first (checkpoint_tree.py).

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

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ringformer.errors import CheckpointError
from ringformer.train import checkpoint_integrity as integrity
from ringformer.train import checkpoint_tree, orbax_failures
from ringformer.train.checkpoint_integrity import MARKER

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MOVED_ASIDE = "moved_aside"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's AtomicRenameTemporaryPath naming


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
        # isascii: str.isdigit() also accepts digits int() cannot parse ('²')
        return {int(p.name): p for p in self.directory.iterdir()
                if p.name.isascii() and p.name.isdigit() and p.is_dir()}

    def all_steps(self) -> list[int]:
        """Every step directory orbax finished writing, valid or not, oldest first."""
        return sorted(self._step_dirs())

    def _check(self, step: int) -> str | None:
        """None if step's files match its COMMITTED table, else the reason; cached per step."""
        if step in self._verdicts:
            return self._verdicts[step]
        step_dir = self.directory / str(step)
        reason = integrity.why_invalid(step_dir, verify_checksums=self.verify_checksums)
        self._verdicts[step] = reason
        return reason

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
        checkpoint_tree.check_finite(self.directory, step, state_pytree)
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
        orbax_failures.quiet_echoes_of_failed_saves()
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
        integrity.write_marker(step_dir, step)
        self._verdicts[step] = None
        if replaced is not None and ".replaced." in replaced.name:
            shutil.rmtree(replaced)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Keep the newest `keep` committed steps up to `newest`; delete older ones.

        Only directories provably our own committed checkpoints count and are deleted
        (`integrity.is_own_checkpoint`); any other number-named directory (a user's, one
        without a marker, one with files added) is left as it is. Steps above `newest` (left
        by a run that went further before it was killed) are not touched. Dead orbax tmp
        dirs below `newest` are removed too.
        """
        dirs = self._step_dirs()
        committed = sorted((s for s, p in dirs.items()
                            if s <= newest and integrity.is_own_checkpoint(p, s)), reverse=True)
        for s in committed[self.keep:]:
            p = dirs[s]
            (p / MARKER).unlink(missing_ok=True)  # first, so a half-deleted dir is never valid
            shutil.rmtree(p)
            self._verdicts.pop(s, None)
        for p in self.directory.glob(f"*{TMP_SUFFIX}*"):
            head = p.name.split(TMP_SUFFIX)[0]
            if head.isascii() and head.isdigit() and int(head) < newest and p.is_dir():
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
                    checkpoint_tree.check_fits(self.directory, s, saved, abstract_state)
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
        checkpoint_tree.check_fits(self.directory, step, self._saved_signature(step),
                                   abstract_state)
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

    def _saved_signature(self, step: int) -> checkpoint_tree.Signature:
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
        return checkpoint_tree.saved_signature(tree)
