"""The evaluation tool's options, checked before anything is loaded.

`check_options` judges everything `tool.run` takes that needs no model, data or tokenizer
(a typo costs seconds, not an evaluation that fails when it writes its results), and
`eval_data_error` gives the data readers' errors a fix in terms of the tool's flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ringformer.data import sources
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import ConfigError, DataError
from ringformer.eval import passkey as passkey_eval


def check_options(*, context: int, out: str, stride: int | None = None,
                  batch_size: int | None = None, passkey: bool = False,
                  passkey_lengths: Sequence[int] | None = None,
                  passkey_depths: Sequence[float] | None = None, passkey_trials: int = 1,
                  passkey_candidates: int = 8) -> None:
    """Raise ConfigError for the first bad option that needs no model, data or tokenizer."""
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
        check_passkey_options(passkey_lengths or [], passkey_depths or passkey_eval.DEPTHS,
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


def check_passkey_options(lengths: Sequence[int], depths: Sequence[float], trials: int,
                  n_candidates: int, context: int) -> None:
    """Passkey options that cannot work, as ConfigError; needs no model, data or tokenizer, so
    the evaluator runs it before loading anything. Empty `lengths` means the default ones.

    `check_passkey_lengths` finishes the job once the tokenizer is known.
    """
    if trials < 1:
        raise ConfigError(f"--passkey_trials {trials} must be at least 1",
                          "pass the number of prompts per length and depth, e.g. 2")
    most, digits = passkey_eval.MAX_CANDIDATES, passkey_eval.KEY_DIGITS
    if not 2 <= n_candidates <= most:
        # With one candidate the true key always ranks first: rank accuracy would read 1.0.
        raise ConfigError(f"--passkey_candidates {n_candidates} must be in [2, {most}]: "
                          f"the true key is ranked among that many distinct {digits}-digit keys",
                          "pass e.g. --passkey_candidates 8")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"--passkey_depths {d} is outside [0, 1]",
                              "give depths as fractions of the prompt, e.g. 0,0.5,1")
    for n in lengths:
        if n < 1:
            raise ConfigError(f"--passkey_lengths {n} must be positive",
                              f"give prompt lengths in tokens up to the context, e.g. {context}")
        if n > context:
            raise ConfigError(f"--passkey_lengths {n} is longer than the context {context}",
                              f"use lengths of at most {context}, or a longer --context")


def check_passkey_lengths(tokenizer: Tokenizer, lengths: Sequence[int], context: int) -> None:
    """Lengths too short for a passkey prompt with this tokenizer, as ConfigError."""
    need = passkey_eval.min_length(tokenizer)
    fix = (f"use lengths from {need} to the context {context}" if need <= context
           else f"use --context {need} or more for passkey retrieval")
    if not lengths:
        raise ConfigError(f"--context {context} is too short for a passkey prompt, which takes at "
                          f"least {need} tokens with tokenizer {tokenizer.name}",
                          f"use --context {need} or more, or leave out --passkey")
    for n in lengths:
        if n < need:
            raise ConfigError(f"--passkey_lengths {n} is too short for a passkey prompt, which "
                              f"takes at least {need} tokens with tokenizer {tokenizer.name}", fix)


# The data readers word their fixes for the trainer's config keys; the tool takes the same
# values by flags, so it gives its own fix for the settings it knows (DataError.setting).
_FLAG_FIXES = {
    sources.FILES_SETTING: "check the --data paths (run scripts/prepare_data.py for the default "
                           "corpus)",
    sources.TEXT_FIELD_SETTING: "pass --text_field with the field or column that holds the text",
}


def eval_data_error(e: DataError) -> DataError:
    """`e` with the fix the tool's user can act on: a flag instead of a config key."""
    fix = _FLAG_FIXES.get(e.setting)
    return e if fix is None else DataError(e.what, fix, setting=e.setting)
