"""The KV cache of generation, sharded over the mesh and never gathered onto one device.

Per layer, keys and values of the kv heads only (GQA): k, v [layers, batch, slots, kv_heads,
head_dim], rows over (dp, fsdp), slots over sp, kv heads over tp (the logical names "layers",
"batch", "length", "kv_heads", "head_dim" of `ringformer.sharding`'s table).

Each sp device's slice of the slots is its prefill block followed by its decode slots:

    device s: [ prompt tokens of ring block s (prefill_len / sp) | decode slots (decode_len / sp) ]

Prefill runs ring attention on the prompt laid out as the model's attention layout says, and
each device keeps the keys and values it computed: the prefill part of the cache is the
prefill activations themselves, padded on every device by its decode slots, with no data
moving between devices. Decode token i (the i-th generated token whose key is stored) goes to
device i mod sp, slot prefill_len / sp + i // sp: new tokens are spread round-robin, so every
device stores and attends to the same number of them.

Which natural position a slot holds is static (`slot_tables`), except that prompts have
different lengths: a row's prompt slots count while their position is below the row's
prompt length (`KVCache.lengths`; prompts are right-padded), its decode slots while their index
is at most the current decode step. Positions are what RoPE saw when k was cached; attention
itself needs only which slots count, because the query is always the newest token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ringformer import sharding
from ringformer.ops import layouts

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static shape of a cache: how many sp devices, prompt and decode slots, the layout."""

    sp: int
    prefill_len: int  # global prompt slots (the padded prompt length), a multiple of sp
    decode_len: int  # global decode slots, a multiple of sp
    layout: str = "contiguous"  # the attention layout the prompt was prefilled in

    @property
    def length(self) -> int:
        return self.prefill_len + self.decode_len

    @property
    def local_prefill(self) -> int:
        return self.prefill_len // self.sp

    @property
    def local_len(self) -> int:
        return self.length // self.sp

    def decode_slot(self, step):
        """(owning sp device, local slot) of decode token `step` (int or traced)."""
        return step % self.sp, self.local_prefill + step // self.sp


jax.tree_util.register_static(CacheSpec)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "lengths", "step", "prev_k", "prev_q"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v [layers, batch, slots, kv_heads, head_dim] (inside a decode loop: tuples of the
    per-layer arrays, `decode.unstack_cache`); lengths [batch] int32 prompt lengths; step:
    int32 scalar, decode tokens stored so far (the next one goes to decode slot `step`)."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    step: jax.Array
    spec: CacheSpec
    # Smeared keys only (model.smear_keys): each layer's keys of every row's newest
    # model.smear_tokens tokens, newest first, before smearing and RoPE, [layers, batch,
    # smear_tokens, kv_heads, head_dim] (a per-layer tuple inside a decode loop): the next
    # token's key mixes them in. None otherwise.
    prev_k: jax.Array | tuple | None = None
    # Likewise the raw queries of the newest smear_tokens - 1 tokens [layers, batch, n, heads,
    # head_dim], when queries are smeared too (smear_tokens 2). None otherwise.
    prev_q: jax.Array | tuple | None = None

    @property
    def positions(self) -> jax.Array:
        """[batch] the natural position of the next token of every row."""
        return self.lengths + self.step


def make_spec(prefill_len: int, max_new_tokens: int, sp: int, layout: str) -> CacheSpec:
    """The cache for a prompt padded to `prefill_len` and up to `max_new_tokens` new tokens.

    The last generated token is never fed back, so max_new_tokens - 1 decode slots suffice,
    rounded up to a multiple of sp.
    """
    per = -(-max(max_new_tokens - 1, 1) // sp)
    return CacheSpec(sp, prefill_len, per * sp, layout if sp > 1 else "contiguous")


def slot_tables(spec: CacheSpec) -> tuple[np.ndarray, np.ndarray]:
    """(index [slots] int32, is_decode [slots] bool) of every global slot: the natural
    position of a prompt slot, the decode index of a decode slot."""
    perm = layouts.permutation(spec.layout, spec.prefill_len, spec.sp).reshape(spec.sp, -1)
    per = spec.decode_len // spec.sp
    dec = np.arange(per)[None, :] * spec.sp + np.arange(spec.sp)[:, None]
    index = np.concatenate([perm, dec], axis=1).reshape(-1).astype(np.int32)
    is_decode = np.concatenate([np.zeros_like(perm, bool), np.ones_like(dec, bool)], 1)
    return index, is_decode.reshape(-1)


def valid_slots(index, is_decode, lengths, step):
    """[batch, slots] bool: the slots a row's newest token attends to once decode token
    `step` is stored. index, is_decode: [slots] (`slot_tables`, or a device's part)."""
    prompt = index[None, :] < lengths[:, None]
    return jnp.where(is_decode[None, :], (index <= step)[None, :], prompt)


def cache_spec_axes(mesh: Mesh, shape: tuple[int, ...]) -> PartitionSpec:
    return sharding.fitted_spec(CACHE_AXES, shape, mesh, params=False)


def cache_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over (dp, fsdp), slots over sp, kv heads over tp."""
    return NamedSharding(mesh, cache_spec_axes(mesh, shape))


def from_prefill(k, v, lengths, spec: CacheSpec, mesh: Mesh | None, prev_k=None,
                 prev_q=None) -> KVCache:
    """The cache from prefill's keys and values [layers, batch, prefill_len, kv, head_dim]
    (in layout order, sharded over sp): each device's block gets its decode slots appended
    where it is, so nothing crosses devices. prev_k, prev_q: see `KVCache`."""
    n_layers, b, s, g, d = k.shape
    per = spec.decode_len // spec.sp

    def grow(x):
        x = x.reshape(n_layers, b, spec.sp, s // spec.sp, g, d)
        x = sharding.constrain(x, ("layers", "batch", "length", None, "kv_heads", "head_dim"),
                               mesh)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, per), (0, 0), (0, 0)))
        return sharding.constrain(x.reshape(n_layers, b, spec.length, g, d), CACHE_AXES, mesh)

    return KVCache(grow(k), grow(v), lengths.astype(jnp.int32), jnp.zeros((), jnp.int32), spec,
                   prev_k, prev_q)


def cache_bytes(cache: KVCache) -> int:
    """Total bytes of the keys and values over all devices."""
    return int(cache.k.nbytes + cache.v.nbytes)
