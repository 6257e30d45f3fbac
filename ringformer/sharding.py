"""Logical axis names -> mesh axes: the one table that decides where every array lives.

Model code names axes logically ("batch", "length", "embed", "heads", "kv_heads", "mlp",
"vocab", "head_dim", "layers"); this module turns those names into PartitionSpecs for
parameters and activations. Parameters shard their "embed" axis over fsdp *and* sp (ZeRO-3
style): every device of either axis needs the whole weight only while a layer runs, so both
can hold a slice and all-gather it per layer. Sharding over sp too matters at long context,
where the batch is a handful of sequences and fsdp cannot grow (the batch is split over
dp x fsdp) but sp can. Activations keep "embed" whole: their batch and sequence already use
those devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("dp", "fsdp")

PARAM_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": "sp",
    "embed": ("fsdp", "sp"),
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "vocab": "tp",
    "head_dim": None,
    "layers": None,
    "norm": None,
}
ACTIVATION_RULES = {**PARAM_RULES, "embed": None}
# Decoding (ringformer.generate): every sp device holds the same new token, so the dense
# layers split their output features over sp as well as tp (tensor parallel), and only
# attention runs per sequence shard of the KV cache. "embed" stays whole: one token's
# activations are tiny, and gathering weights per step would cost more than it saves. The
# attention projections split head_dim over sp (heads over tp): head_dim (64, 128) splits
# over the usual sp sizes where head counts (12 heads, 4 kv heads on sp = 8) often do not.
DECODE_PARAM_RULES = {**ACTIVATION_RULES, "heads": "tp", "kv_heads": "tp", "head_dim": "sp",
                      "mlp": ("tp", "sp"), "vocab": ("tp", "sp")}


def logical_to_spec(names: Sequence[str | None], *, params: bool = False,
                    rules: dict | None = None) -> PartitionSpec:
    rules = rules if rules is not None else (PARAM_RULES if params else ACTIVATION_RULES)
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    entry = (entry,) if isinstance(entry, str) else entry
    size = 1
    for a in entry:
        size *= mesh.shape[a]
    return size


def _fit(entry, dim: int, mesh: Mesh):
    """The longest prefix of `entry`'s mesh axes whose size divides `dim` (None if none)."""
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    while axes and dim % _axis_size(mesh, axes):
        axes = axes[:-1]
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def fitted_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                *, params: bool = True, rules: dict | None = None) -> PartitionSpec:
    """The rules' spec, dropping mesh axes a dimension does not divide (e.g. vocab 259 stays
    whole; embed 96 on fsdp=2 x sp=4 splits over fsdp only). `rules` overrides the table."""
    spec = logical_to_spec(names, params=params, rules=rules)
    return PartitionSpec(*(_fit(e, dim, mesh) for e, dim in zip(spec, shape, strict=True)))


def param_shardings(abstract_params, logical_names, mesh: Mesh, *, rules: dict | None = None):
    """NamedShardings for a params pytree from its shapes (`jax.eval_shape`) and logical names.

    `logical_names` mirrors `abstract_params` with a tuple of names per leaf.
    """
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, fitted_spec(names, x.shape, mesh, rules=rules)),
        abstract_params, logical_names,
        is_leaf=lambda n: isinstance(n, tuple) and all(isinstance(s, str | None) for s in n))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] token arrays: batch over (dp, fsdp), sequence over sp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, names: Sequence[str | None], mesh: Mesh | None):
    """Pin an activation to the rules' sharding by logical names; a no-op without a mesh.

    Dimensions the mesh axes do not divide stay replicated (same fitting as parameters), so
    odd shapes in small tests never fail here.
    """
    if mesh is None:
        return x
    spec = fitted_spec(names, x.shape, mesh, params=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def seq_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["sp"]


def num_seq_chunks(seq_len: int, chunk: int, mesh: Mesh | None) -> int:
    """How many chunks to cut a sequence into so each device handles `chunk` tokens at a time.

    `chunk` counts tokens per sequence shard (what config.validate checks against
    seq_len / sp). A chunk that does not divide the local length falls back to their gcd, so
    ad-hoc small inputs (e.g. `model.logits` on a 10-token prompt) still run exactly.
    """
    sp = seq_shards(mesh)
    local = seq_len // sp if seq_len % sp == 0 else seq_len
    c = max(1, min(chunk, local))
    if local % c:
        c = math.gcd(local, c)
    return local // c


def split_seq_chunks(x, n_chunks: int, axis: int = 1):
    """[..., seq, ...] -> [n_chunks, ..., seq // n_chunks, ...] with chunk j = tokens i*n + j.

    Strided (not contiguous) chunks: reshaping seq into (seq // n, n) keeps the outer factor
    sharded over sp exactly as seq was, so every chunk is spread evenly over the sp devices
    and a scan over chunks needs no communication. Token-wise maps (MLP, loss) do not care
    which tokens share a chunk.
    """
    s = x.shape[axis]
    x = x.reshape((*x.shape[:axis], s // n_chunks, n_chunks, *x.shape[axis + 1:]))
    return jnp.moveaxis(x, axis + 1, 0)


def merge_seq_chunks(x, axis: int = 1):
    """Inverse of `split_seq_chunks`."""
    n = x.shape[0]
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape((*x.shape[:axis], x.shape[axis] * n, *x.shape[axis + 2:]))
