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
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "striped", "zigzag")


def _check(layout: str, seq_len: int, n: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    # One device holds the whole sequence in natural order under every layout.
    unit = 2 * n if layout == "zigzag" and n > 1 else n
    if seq_len % unit:
        raise ValueError(f"layout {layout!r} over {n} devices needs a sequence divisible by {unit}, "
                         f"got {seq_len}")


def permutation(layout: str, seq_len: int, n: int) -> np.ndarray:
    """`perm` with laid_out[..., j] = natural[..., perm[j]]."""
    _check(layout, seq_len, n)
    idx = np.arange(seq_len)
    if layout == "contiguous" or n == 1:
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
    return x if layout == "contiguous" else x.take(perm, axis=axis)


def unpermute(x, layout: str, n: int, axis: int = 1):
    """Layout order -> natural order along `axis`."""
    perm = permutation(layout, x.shape[axis], n)
    return x if layout == "contiguous" else x.take(inverse(perm), axis=axis)


def local_token_index(layout: str, local_len: int, n: int, device):
    """Natural indices [local_len] of the tokens device `device` (int or traced) holds."""
    i = jnp.arange(local_len, dtype=jnp.int32)
    d = jnp.asarray(device, dtype=jnp.int32)
    if layout == "contiguous" or n == 1:
        return d * local_len + i
    if layout == "striped":
        return i * n + d
    if layout == "zigzag":
        c = local_len // 2
        return jnp.where(i < c, d * c + i, (2 * n - 1 - d) * c + (i - c))
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
