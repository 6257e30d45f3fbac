"""The one kind of error a user is meant to see: what went wrong and how to fix it.

Scripts catch `UserError` and print `error: <what> (<fix>)` on one line with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
