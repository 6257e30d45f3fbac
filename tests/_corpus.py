"""A small word-salad corpus that trainer tests in several directories share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["ring", "attention", "block", "device", "token", "the", "a", "of", "key", "value",
         "query", "softmax", "sum", "max", "scan", "shard", "mesh", "layer", "norm", "rope"]


def write_corpus(path: Path, n_docs: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(rng.integers(20, 200))
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, n))}) + "\n")
    return path
