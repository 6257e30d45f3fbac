"""The evaluation tool's options, checked before anything is loaded.

`check_options` judges everything `evaluate.run` takes that needs no model, data or tokenizer
(a typo costs seconds, not an evaluation that fails when it writes its results), and
`eval_data_error` words the data readers' errors for the tool's flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ringformer.errors import ConfigError, DataError


def check_options(*, context: int, out: str, stride: int | None = None,
                  batch_size: int | None = None, passkey: bool = False,
                  passkey_lengths: Sequence[int] | None = None,
                  passkey_depths: Sequence[float] | None = None, passkey_trials: int = 1,
                  passkey_candidates: int = 8) -> None:
    """Raise ConfigError for the first bad option that needs no model, data or tokenizer."""
    from ringformer.eval import passkey as passkey_eval

    if context < 1:
        raise ConfigError(f"--context {context} must be positive", "pass e.g. --context 4096")
    if stride is not None and not 1 <= stride <= context:
        raise ConfigError(f"--stride {stride} must be in [1, context={context}]",
                          "use a stride no longer than the context, or leave it out")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch {batch_size} must be positive",
                          "pass a multiple of dp*fsdp, or leave it out")
    _check_out(out, passkey)
    if passkey:
        passkey_eval.check_options(passkey_lengths or [], passkey_depths or passkey_eval.DEPTHS,
                                   passkey_trials, passkey_candidates, context)


def _check_out(out: str, passkey: bool) -> None:
    """--out and the plots beside it must be files that can be written."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory",
                          f"name the JSON file to write, e.g. --out {path / 'eval.json'}")
    plots = [path.with_suffix(".png")]
    if passkey:
        plots.append(path.with_name(path.stem + "_passkey.png"))
    for plot in plots:
        if plot == path:
            raise ConfigError(f"--out {out} is also where its plot goes",
                              f"name a .json file, e.g. --out {path.with_suffix('.json')}")
        if plot.is_dir():
            raise ConfigError(f"the plot of --out {out} goes to {plot}, which is a directory",
                              "choose another --out")
    # The nearest existing ancestor decides whether the missing directories can be created.
    first = next(p for p in (path, *path.absolute().parents) if p.exists() or p == p.parent)
    if first != path and not first.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {first} is a file, not a directory",
                          "choose another --out")
    if not os.access(first, os.W_OK):
        raise ConfigError(f"--out {out} cannot be written: {first} is not writable",
                          "choose a writable --out")


# Data errors name the trainer's config keys; the evaluator takes the same data by flags.
_EVAL_FIXES = (("data.train_files / data.eval_files", "the --data paths"),
               ("set data.text_field", "pass --text_field"))


def eval_data_error(e: DataError) -> DataError:
    fix = e.fix
    for key, flag in _EVAL_FIXES:
        fix = fix.replace(key, flag)
    return DataError(e.what, fix)
