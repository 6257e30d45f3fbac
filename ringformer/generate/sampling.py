"""Choosing the next token from fp32 logits: greedy, temperature, top-k, top-p, seeded.

`Sampling` is static (hashable): the decode loop is compiled for one setting. Temperature 0
and top_k 1 are greedy exactly (argmax, no random draw), so they equal greedy decoding token
for token. A draw depends only on the seed, the step and the logits: the same seed, prompts
and model give the same text.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ringformer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = no limit; top_p 1 = no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature {self.temperature} must be >= 0",
                              "use 0 for greedy decoding or e.g. 0.8 to sample")
        if self.top_k < 0:
            raise ConfigError(f"top_k {self.top_k} must be >= 0", "use 0 for no limit, 1 for greedy")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p {self.top_p} must be in (0, 1]", "use 1 for no nucleus cut")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(logits: jax.Array, key: jax.Array, step, sampling: Sampling) -> jax.Array:
    """Next tokens [b] int32 from logits [b, vocab] (fp32); `step` (traced) picks the draw."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / sampling.temperature
    if 0 < sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass
        # before it is still short of top_p (so the most likely one always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return jax.random.categorical(jax.random.fold_in(key, step), x, axis=-1).astype(jnp.int32)
