"""Whether a stored state tree fits the state a run expects, told leaf by leaf.

A checkpoint of another model or optimizer config would fail deep inside orbax with a shape
error; comparing orbax's metadata with the caller's abstract state first gives one message
that names the differing leaves and which config (model or optimizer) differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from ringformer.errors import CheckpointError

Signature = dict[str, tuple[tuple[int, ...], str]]  # leaf name -> (shape, dtype)


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


def saved_signature(tree: Any) -> Signature:
    """The signature of a stored tree, from orbax's metadata of it."""
    return {_leaf_name(p): (tuple(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def check_fits(directory: Path, step: int, saved: Signature, abstract_state: Any) -> None:
    """Raise CheckpointError naming up to three leaves where `saved` and `abstract_state`
    differ (missing, extra, other shape or dtype)."""
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
            f"checkpoint step {step} in {directory} was written by a different {what} config:"
            f" {'; '.join(problems[:3])}{more}", f"{fix}, or use a fresh --workdir")


@jax.jit
def _finite_leaves(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.numpy.all(jax.numpy.isfinite(x))
                        if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact) else True, tree)


def check_finite(directory: Path, step: int, tree: Any) -> None:
    """Raise CheckpointError if a float leaf of `tree` holds inf or NaN.

    A resume restores the newest valid checkpoint, so a non-finite one saved once would be
    the "last good" state of every later run; whatever produced it (a diverged update, a
    damaged init_from), it is never written.
    """
    flags = jax.device_get(_finite_leaves(tree))
    bad = [_leaf_name(p) for p, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"the state at step {step} holds non-finite values ({', '.join(bad[:3])}{more});"
            f" it was not saved in {directory}",
            "lower optim.lr or check the data and train.init_from; the checkpoints already in"
            " the workdir are kept")
