"""Which documents an epoch packs: weighted sources, length filters, long-document repeats.

`data.sources` is a comma-separated list of `FILES:WEIGHT[:TOKENS:REPEAT]` entries: FILES a
path, glob or directory; WEIGHT > 0 the share of the documents drawn from it; documents of at
least TOKENS tokens are repeated REPEAT times in each of its epochs (the context-extension
recipe: over-sample long documents). `data.upsample_long = "TOKENS:REPEAT"` applies to every
source without its own. Empty `data.sources`: `data.train_files` is the one source, weight 1.

Jax-free and datasets-free: `ringformer.config` validates with these parsers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ringformer.errors import ConfigError

_FORMAT = "write data.sources as FILES:WEIGHT[:TOKENS:REPEAT],... e.g. data/a/*.jsonl:0.7,data/b.jsonl:0.3"


@dataclass(frozen=True)
class SourceSpec:
    files: object  # a path, glob, directory, or list of them (data.train_files)
    weight: float = 1.0
    long_tokens: int = 0  # 0: no up-sampling
    repeat: int = 1


def parse_upsample(text: str, name: str = "data.upsample_long") -> tuple[int, int]:
    """"TOKENS:REPEAT" -> (TOKENS, REPEAT); "" -> (0, 1)."""
    if not text.strip():
        return 0, 1
    parts = text.strip().split(":")
    ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
    if not ok or int(parts[0]) < 1 or int(parts[1]) < 1:
        raise ConfigError(f"{name}={text!r} is not TOKENS:REPEAT with positive integers",
                          "e.g. 8192:4 repeats documents of 8192 tokens or more 4 times")
    return int(parts[0]), int(parts[1])


def parse_sources(text: str, upsample: str = "") -> list[SourceSpec]:
    """`data.sources` -> specs (see the module doc); ConfigError on a bad entry."""
    default_long = parse_upsample(upsample)
    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (1, 2, 4) or not parts[0].strip():
            raise ConfigError(f"data.sources entry {entry!r} is not FILES:WEIGHT[:TOKENS:REPEAT]",
                              _FORMAT)
        try:
            weight = float(parts[1]) if len(parts) > 1 else 1.0
        except ValueError:
            raise ConfigError(f"data.sources entry {entry!r} has weight {parts[1]!r}, not a number",
                              _FORMAT) from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"data.sources entry {entry!r} has weight {parts[1]}; weights must "
                              "be positive", "give every source a weight > 0, or remove it")
        long = parse_upsample(":".join(parts[2:]), f"data.sources entry {entry!r}") \
            if len(parts) == 4 else default_long
        out.append(SourceSpec(parts[0].strip(), weight, *long))
    return out


def train_sources(config_data) -> list[SourceSpec]:
    """The training sources of a `data` config section (missing keys: their defaults)."""
    upsample = config_data.get("upsample_long", "") or ""
    specs = parse_sources(config_data.get("sources", "") or "", upsample)
    if specs:
        return specs
    return [SourceSpec(config_data.train_files, 1.0, *parse_upsample(upsample))]


def length_filter(lengths: np.ndarray, min_tokens: int, max_tokens: int) -> np.ndarray:
    """Indices of documents whose packed length (BOS + text + EOS) is within the limits."""
    # Compared as `lengths >= min - 1`, not `lengths + 1 >= min`: the index holds lengths in
    # their narrowest dtype, where + 1 could wrap.
    keep = lengths >= min_tokens - 1
    if max_tokens > 0:
        keep &= lengths <= max_tokens - 1
    return np.flatnonzero(keep)


def quotas(n: int, weights: np.ndarray) -> np.ndarray:
    """`n` split in proportion to `weights`, rounding by largest remainder (sums to `n`)."""
    exact = n * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    rest = n - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


class Plan:
    """A share's epochs over its documents (`source[d]`, `length[d]` per document).

    Plain (one source, no repeats): None, and the iterator shuffles all documents itself
    (the order of earlier versions, bit for bit). Otherwise each epoch draws `quotas(N)`
    documents from the sources' pools, N the total pool size, a long document sitting in its
    pool `repeat` times. A source's draws walk through seeded permutations of its pool, one
    after the other, so over epochs it is covered evenly, repeated when its weight asks for
    more documents than it has.
    """

    def __init__(self, specs: list[SourceSpec], source: np.ndarray, length: np.ndarray,
                 seed: int, share: int):
        self.seed, self.share = seed % 2**63, share
        self.pools = []
        long = [np.zeros(0, bool) if not spec.long_tokens or spec.repeat == 1
                else length >= spec.long_tokens - 1 for spec in specs]  # no + 1: may wrap
        self.plain = len(specs) == 1 and not long[0].any()
        # Plain: the iterator shuffles all documents itself; no pool (8 bytes a document).
        for s, spec in enumerate([] if self.plain else specs):
            docs = np.flatnonzero(source == s)
            reps = np.where(long[s][docs], spec.repeat, 1) if len(long[s]) \
                else np.ones(len(docs), np.int64)
            self.pools.append(np.repeat(docs, reps))
        self.counts = quotas(sum(len(p) for p in self.pools) if self.pools else len(source),
                             np.array([s.weight for s in specs], np.float64))

    def documents(self, epoch: int) -> np.ndarray:
        """The documents of `epoch`, grouped by source (the iterator shuffles them)."""
        picks = []
        for s, (pool, n) in enumerate(zip(self.pools, self.counts, strict=True)):
            lo, hi = epoch * int(n), (epoch + 1) * int(n)
            c0, c1 = lo // len(pool), max(lo, hi - 1) // len(pool)
            cycles = [pool[np.random.default_rng([self.seed, self.share, s, c]).permutation(len(pool))]
                      for c in range(c0, c1 + 1)]
            picks.append(np.concatenate(cycles)[lo - c0 * len(pool):hi - c0 * len(pool)])
        return np.concatenate(picks)
