"""Logical axis names -> mesh axes: the one table that decides where every array lives.

Model code names axes logically ("batch", "length", "embed", "heads", "kv_heads", "mlp",
"vocab", "head_dim", "layers"); this module turns those names into PartitionSpecs for
parameters and activations. Parameters shard their "embed" axis over fsdp (ZeRO-3 style);
activations keep "embed" whole because their batch already uses the fsdp devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("dp", "fsdp")

PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": "sp",
    "embed": "fsdp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "vocab": "tp",
    "head_dim": None,
    "layers": None,
    "norm": None,
}
ACTIVATION_RULES = {**PARAM_RULES, "embed": None}


def logical_to_spec(names: Sequence[str | None], *, params: bool = False) -> PartitionSpec:
    rules = PARAM_RULES if params else ACTIVATION_RULES
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    entry = (entry,) if isinstance(entry, str) else entry
    size = 1
    for a in entry:
        size *= mesh.shape[a]
    return size


def fitted_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                *, params: bool = True) -> PartitionSpec:
    """The rules' spec, replicating any dimension the mesh axes do not divide (e.g. vocab 259)."""
    spec = logical_to_spec(names, params=params)
    return PartitionSpec(*(e if dim % _axis_size(mesh, e) == 0 else None
                           for e, dim in zip(spec, shape, strict=True)))


def param_shardings(abstract_params, logical_names, mesh: Mesh):
    """NamedShardings for a params pytree from its shapes (`jax.eval_shape`) and logical names.

    `logical_names` mirrors `abstract_params` with a tuple of names per leaf.
    """
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, fitted_spec(names, x.shape, mesh)),
        abstract_params, logical_names,
        is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(s, str | None) for s in n))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] token arrays: batch over (dp, fsdp), sequence over sp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
