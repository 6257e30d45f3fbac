"""Next-token cross-entropy over sequence chunks: full [batch, seq, vocab] logits never exist.

At long context the logits dominate memory (a 32K sequence x 128K vocab x fp32 is 16 GiB per
row), so the loss runs a `lax.scan` over sequence chunks and wraps each chunk in
`jax.checkpoint`: the forward keeps only the running sum, the backward recomputes one chunk's
logits at a time. Chunks are strided over the sequence (see `sharding.split_seq_chunks`) so
each chunk's logits are sharded like the sequence itself: every sp device works on its own
tokens and no device ever holds more than [batch/dp/fsdp, chunk, vocab/tp] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from ringformer import sharding

F32 = jnp.float32


def token_losses(logits, targets):
    """Per-token -log p(target) from fp32 logits [..., vocab] and int targets [...].

    The target logit is picked with a one-hot compare rather than a gather so a vocab axis
    sharded over tp reduces with one psum instead of gathering the logits.
    """
    logits = logits.astype(F32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def chunked_cross_entropy(hidden, head_w, targets, loss_mask, *, chunk: int,
                          return_per_position: bool = False, mesh: Mesh | None = None):
    """Summed next-token loss without materialising the logits.

    hidden: [batch, seq, dim] final-normed states (any float dtype); head_w: [dim, vocab];
    targets: [batch, seq] ints; loss_mask: [batch, seq] (bool or 0/1; positions with 0 add
    nothing, whatever their target). `chunk` is tokens per chunk per sequence shard (sp from
    `mesh`, 1 without one). Logits are fp32 (matmul accumulates in fp32 from the inputs' dtype).

    Returns (loss_sum, n_tokens) as fp32 scalars, plus per-position losses [batch, seq] (0
    where masked, same order as the inputs) when `return_per_position`.
    """
    b, s, _ = hidden.shape
    if targets.shape != (b, s) or loss_mask.shape != (b, s):
        raise ValueError(f"targets {targets.shape} and loss_mask {loss_mask.shape} must be "
                         f"[batch, seq] = {(b, s)} like hidden {hidden.shape}")
    n = sharding.num_seq_chunks(s, chunk, mesh)
    mask = loss_mask.astype(F32)
    head_w = head_w.astype(hidden.dtype)

    def body(total, xs):
        h, t, m = xs
        logits = jnp.einsum("bcd,dv->bcv", h, head_w, preferred_element_type=F32)
        logits = sharding.constrain(logits, ("batch", "length", "vocab"), mesh)
        per = token_losses(logits, t) * m
        return total + jnp.sum(per), per

    # nothing_saveable: the backward recomputes this chunk's logits instead of keeping them.
    body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    xs = tuple(sharding.split_seq_chunks(x, n) for x in (hidden, targets, mask))
    total, per = lax.scan(body, jnp.zeros((), F32), xs)
    n_tokens = jnp.sum(mask)
    if return_per_position:
        return total, n_tokens, sharding.merge_seq_chunks(per)
    return total, n_tokens


def full_cross_entropy(logits, targets, loss_mask):
    """Reference on materialised logits [batch, seq, vocab]: (loss_sum, n_tokens). Small inputs."""
    mask = loss_mask.astype(F32)
    return jnp.sum(token_losses(logits, targets) * mask), jnp.sum(mask)
