"""The one kind of error a user is meant to see: what went wrong and how to fix it.

Scripts catch `UserError` and print `error: <what> (<fix>)` on one line with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys


class UserError(Exception):
    """A bad input (config, data, path, checkpoint, mesh) with a one-line reason and a fix."""

    def __init__(self, what: str, fix: str = ""):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})" if fix else what)


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; raised before anything is compiled."""


class DataError(UserError):
    """Training or evaluation data that cannot be read.

    `setting` names the config key the fix is about (e.g. "data.text_field"), so a tool that
    takes the same value by a flag can word its own fix instead of editing this one's text.
    """

    def __init__(self, what: str, fix: str = "", *, setting: str = ""):
        super().__init__(what, fix)
        self.setting = setting


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or written by an incompatible config."""


def close_all(*closers) -> None:
    """Call every closer in order, even after one fails, and raise the first failure.

    An exception already propagating (the caller is in a `finally` block) is the one to
    report: a closer that then fails on the same cause (a full disk fails the metrics flush
    after the checkpoint) must not replace it, so its failure is only logged at DEBUG.
    """
    in_flight = sys.exc_info()[1]
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except Exception as e:
            if first is None:
                first = e
            logging.getLogger(__name__).debug("%s failed during cleanup", close, exc_info=True)
    if first is not None and in_flight is None:
        raise first
