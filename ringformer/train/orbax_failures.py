"""Containing a failed orbax save: one report, and no threads left waiting.

When orbax cannot write a step (a full disk, a checkpoints path that became a file), every one
of its handler threads logs the failure with its traceback, and the threads wait on for a
signal that never comes, which keeps the interpreter from exiting. `Checkpointer` reports the
failure once, as a CheckpointError; this module holds back orbax's log records meanwhile and
releases its threads. It reaches into orbax internals (0.12.x), each use guarded so that a
change there leaves the old behaviour, not a new failure.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
_ORBAX_DIR = str(Path(ocp.__file__).parent)


class HeldOrbaxErrors(logging.Filter):
    """Holds orbax's error records while one of our saves is in flight.

    A failed background save makes orbax log the failure, traceback and all, from every
    thread it reaches (about 200 lines for one full disk); we report it once, as a
    CheckpointError chained to orbax's exception. Held records are shown at DEBUG if the save
    failed and as they were if it succeeded.
    """

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.pathname.startswith(_ORBAX_DIR):
            self.held.append(record)
            return False
        return True


def release_threads(operation_id: str | None) -> None:
    """Let the orbax threads of a failed save end, so the interpreter can exit.

    Orbax 0.12.8's handler threads wait for a "directory created" signal before they write;
    when creating the directory fails the signal is never sent, and the threads (not daemons)
    wait on with a 300 s timeout each, which Python sits out at exit (a script's error path
    also exits past them: `cli.run_main`). They are cancelled, then sent the signals they wait
    for: a cancelled thread returns without running its write. This uses orbax internals; if
    they change it does nothing.

    Single-process only: with several processes the signals live in the shared key-value
    store and would wake the peers' threads, uncancelled, into writing.
    """
    if jax.process_count() > 1:
        return
    try:
        from orbax.checkpoint._src.futures import future as ocp_future

        stuck = [t for t in threading.enumerate()
                 if isinstance(t, ocp_future._SignalingThread) and t.is_alive()
                 and getattr(t, "_operation_id", None) == operation_id]
        for t in stuck:
            t.cancel()
        for t in stuck:
            ocp_future.set_signals(t._receive_signals, operation_id=operation_id)
        for t in stuck:
            threading.Thread.join(t, timeout=10)  # its own join() raises CancelledError
            # Its write never ran: close that coroutine, or Python warns at exit that it was
            # never awaited (a dozen lines after our one error line).
            _close_coroutines(getattr(t, "_target", None))
    except Exception:  # best effort: the save has already failed and is being reported
        log.debug("could not release orbax's threads of operation %s", operation_id, exc_info=True)


def _close_coroutines(fn: Any, depth: int = 3) -> None:
    """Close the unstarted coroutines that `fn` holds in its closure, or in theirs."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if inspect.iscoroutine(value):
            _close_coroutine(value, depth)
        elif depth > 0 and inspect.isfunction(value):
            _close_coroutines(value, depth - 1)


def _close_coroutine(coro: Any, depth: int) -> None:
    # An unstarted wrapper holds the coroutine it wraps as an argument, unstarted too.
    if depth > 0 and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
        for value in list(coro.cr_frame.f_locals.values()):
            if inspect.iscoroutine(value):
                _close_coroutine(value, depth - 1)
    coro.close()


def quiet_echoes_of_failed_saves() -> None:
    """Keep the echoes of a failed orbax save off stderr; the failure itself is reported once.

    Orbax runs each save's coroutine on an event loop of its own and closes the loop when
    the coroutine ends. When one write fails (a full disk) the coroutine ends at once, and
    - each of its other writes, finishing later, tries to wake the closed loop: tensorstore
      reports that RuntimeError as unraisable (PyErr_WriteUnraisable, so through
      sys.unraisablehook, whose default prints its traceback), dozens of them, before and
      after our one error line;
    - the writes that failed too are tasks nobody awaits: asyncio logs "Task exception was
      never retrieved" with a traceback when they are garbage collected, even at exit.
    Nothing waits on that loop or those tasks any more, so both go to DEBUG; any other
    exception or asyncio record passes as before. Installed once per process, at the first
    save, since the echoes outlive the save that caused them.
    """
    if getattr(sys.unraisablehook, "_ringformer_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if _is_callback_to_closed_loop(exc, unraisable.exc_traceback):
            log.debug("a callback to a closed event loop (a failed orbax save)",
                      exc_info=(type(exc), exc, unraisable.exc_traceback))
            return
        previous(unraisable)

    hook._ringformer_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_unretrieved_orbax_failure)


def _is_callback_to_closed_loop(exc: BaseException | None, tb: Any) -> bool:
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    return "call_soon_threadsafe" in [f.name for f in traceback.extract_tb(tb)]


def _unretrieved_orbax_failure(record: logging.LogRecord) -> bool:
    """False (drop, after a DEBUG copy) for asyncio's report of an orbax task's lost error."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or not any(f.filename.startswith(_ORBAX_DIR)
                              for f in traceback.extract_tb(exc.__traceback__)):
        return True
    log.debug("asyncio: %s", record.getMessage(), exc_info=record.exc_info)
    return False


def current_operation_id() -> str | None:
    """Orbax's id of the save just started: its threads carry it (an orbax internal)."""
    try:
        from orbax.checkpoint._src.futures import synchronization

        return synchronization.OperationIdGenerator.get_current_operation_id()
    except Exception:
        return None
