"""Sequence layouts that balance causal ring attention across the `sp` devices.

A layout is a permutation of token positions applied once, in the data path, to tokens,
targets, positions and segment ids. Device `d` of `n` then holds the `d`-th contiguous block
of the permuted sequence. Attention recovers each token's natural index with
`local_token_index`, so the causal mask stays exact whatever the layout.

- contiguous: device d holds tokens [d*L, (d+1)*L). Causal work is lopsided: the last device
  attends to everything, the first to its own block only.
- striped (Brandon et al. 2023): token i goes to device i mod n, so every device sees every
  region of the sequence.
- zigzag: the sequence is cut into 2n chunks and device d holds chunks d and 2n-1-d, pairing
  an early (cheap) chunk with a late (expensive) one.

Every rule that follows from a layout (which one is in effect, how many pieces it cuts a
sequence into, how large an attention chunk may be) is here and nowhere else. Only numpy at
import: `ringformer.config` checks configs with these rules before jax is started.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("contiguous", "striped", "zigzag")


def effective(layout: str, n: int) -> str:
    """The layout in effect over `n` sequence shards: one device holds the whole sequence in
    natural order whatever the config names, so it needs no permutation."""
    return layout if n > 1 else "contiguous"


def pieces(layout: str, n: int) -> int:
    """How many equal pieces `layout` cuts a sequence into over `n` devices (the sequence
    length must be a multiple): two per device for zigzag, one otherwise."""
    return 2 * n if effective(layout, n) == "zigzag" else n


def chunk_cap(layout: str, local: int, n: int) -> int:
    """The largest attention chunk for a device block of `local` tokens: half the block for a
    zigzag ring, whose two halves lie far apart (a tile straddling them spans the whole
    sequence and could never be skipped), else the whole block."""
    return local // 2 if effective(layout, n) == "zigzag" else local


def check(layout: str, seq_len: int, n: int) -> None:
    """ValueError unless `layout` is known and splits `seq_len` tokens over `n` devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    unit = pieces(layout, n)
    if seq_len % unit:
        raise ValueError(f"layout {layout!r} over {n} devices needs a sequence divisible by {unit}, "
                         f"got {seq_len}")


def permutation(layout: str, seq_len: int, n: int) -> np.ndarray:
    """`perm` with laid_out[..., j] = natural[..., perm[j]]."""
    check(layout, seq_len, n)
    idx = np.arange(seq_len)
    if effective(layout, n) == "contiguous":
        return idx
    if layout == "striped":
        return idx.reshape(-1, n).T.reshape(-1)
    chunks = idx.reshape(2 * n, -1)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def permute(x, layout: str, n: int, axis: int = 1):
    """Natural order -> layout order along `axis` (numpy or jax arrays)."""
    perm = permutation(layout, x.shape[axis], n)
    return x if effective(layout, n) == "contiguous" else x.take(perm, axis=axis)


def unpermute(x, layout: str, n: int, axis: int = 1):
    """Layout order -> natural order along `axis`."""
    perm = permutation(layout, x.shape[axis], n)
    return x if effective(layout, n) == "contiguous" else x.take(inverse(perm), axis=axis)


def local_token_index(layout: str, local_len: int, n: int, device):
    """Natural indices [local_len] of the tokens device `device` (int or traced) holds."""
    import jax.numpy as jnp  # here, not at the top: see the module docstring

    i = jnp.arange(local_len, dtype=jnp.int32)
    d = jnp.asarray(device, dtype=jnp.int32)
    if effective(layout, n) == "contiguous":
        return d * local_len + i
    if layout == "striped":
        return i * n + d
    if layout == "zigzag":
        c = local_len // 2
        return jnp.where(i < c, d * c + i, (2 * n - 1 - d) * c + (i - c))
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
