"""Passkey retrieval by real greedy generation: the model writes the key, exact match scores it.

`passkey.py` scores candidate keys teacher-forced (cheap, and its greedy verdict equals greedy
decoding's); this is the end-to-end check that a user of `scripts/generate.py` would see:
every prompt is prefilled and decoded greedily for a few tokens, and the answer counts when
the first run of digits in the generated text is exactly the key.

Prompts come from a file (`scripts/prepare_data.py --retrieval_examples N` writes
`data/longctx/heldout_passkey.jsonl`: keys and filler never trained on) or are built here with
`ringformer.data.passkey` (its standard filler, random keys). Like passkey.py this module
knows nothing about JAX: it takes `generate(prompts, max_new_tokens) -> new ids per prompt`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ringformer.data.passkey import make_passkey_example, random_key
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import DataError

GenerateFn = Callable[[list[list[int]], int], list[Sequence[int]]]
FIELDS = ("prompt", "key", "length", "depth")
# Rows prefilled together at most, in tokens: 4 prompts of 16K, 64 of 1K.
BATCH_TOKENS = 1 << 16


def read_prompts(path: str | Path) -> list[dict]:
    """Records with `prompt`, `key`, `length` and `depth` from a JSON-lines file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read --passkey_file {path}: {e}",
                        "run scripts/prepare_data.py --retrieval_examples N, or fix the path"
                        ) from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and all(k in rec for k in FIELDS) \
                and str(rec["key"]).isdigit()
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"{path}:{i}: not a passkey prompt (needs {', '.join(FIELDS)}, "
                            "a key of digits)", "use the file scripts/prepare_data.py writes")
        out.append({k: rec[k] for k in FIELDS})
    if not out:
        raise DataError(f"--passkey_file {path} holds no prompts", "point it at a non-empty file")
    return out


def make_prompts(tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], *,
                 trials: int = 1, seed: int = 0) -> list[dict]:
    """`trials` prompts per (length, depth) with the standard filler; like passkey.make_tasks,
    `length` bounds prompt + answer."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        for d in depths:
            for _ in range(trials):
                key = random_key(rng)
                room = len(tokenizer.encode(f" {key}")) + 2
                ex = make_passkey_example(int(n) - room, float(d), tokenizer=tokenizer, key=key)
                out.append({"prompt": ex.text, "key": key, "length": int(n), "depth": float(d)})
    return out


def generated_key(text: str) -> str:
    """The first run of digits in a continuation ('' if none): what the model answered."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def _batches(items: list[int], lengths: list[int]) -> list[list[int]]:
    """Indices grouped by prompt length (one compiled program each), BATCH_TOKENS at most."""
    groups: dict[int, list[int]] = {}
    for i in items:
        groups.setdefault(lengths[i], []).append(i)
    out = []
    for n, idx in sorted(groups.items()):
        size = max(1, min(len(idx), BATCH_TOKENS // max(n, 1)))
        out.extend(idx[j:j + size] for j in range(0, len(idx), size))
    return out


def run_generate(generate: GenerateFn, tokenizer: Tokenizer, prompts: Sequence[dict], *,
                 progress: bool = False) -> dict:
    """Greedy generation for every prompt; the accuracy table by length x depth and each
    prompt's result (`generated`, `predicted` key, `greedy` verdict)."""
    from tqdm.auto import tqdm

    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [bos + tokenizer.encode(p["prompt"]) for p in prompts]
    new = max(len(tokenizer.encode(f" {p['key']}")) for p in prompts) + 2
    texts: list[str] = [""] * len(prompts)
    batches = _batches(list(range(len(prompts))), [p["length"] for p in prompts])
    with tqdm(total=len(prompts), desc="passkey (greedy generation)", unit="prompt",
              disable=not progress, dynamic_ncols=True) as bar:
        for group in batches:
            outs = generate([ids[i] for i in group], new)
            for i, o in zip(group, outs, strict=True):
                texts[i] = tokenizer.decode(np.asarray(o, np.int64))
            bar.update(len(group))
    results = [{"length": int(p["length"]), "prompt_tokens": len(ids[i]),
                "depth": float(p["depth"]), "key": str(p["key"]), "generated": texts[i],
                "predicted": generated_key(texts[i]),
                "greedy": generated_key(texts[i]) == str(p["key"])}
               for i, p in enumerate(prompts)]
    return {**table(results), "scoring": "greedy generation; exact match of the first run of "
                                         "digits in the generated text with the key",
            "examples": results}


def table(results: Sequence[dict]) -> dict:
    """[length][depth] greedy accuracies (None where no prompt), the mean over all prompts,
    the mean and count per length."""
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})

    def mean(rows: list[dict]) -> float | None:
        return float(np.mean([r["greedy"] for r in rows])) if rows else None

    grid = [[mean([r for r in results if r["length"] == n and r["depth"] == d])
             for d in depths] for n in lengths]
    per_length = [mean([r for r in results if r["length"] == n]) for n in lengths]
    return {"lengths": lengths, "depths": depths, "greedy_accuracy": grid,
            "greedy_by_length": per_length,
            "prompts_by_length": [sum(r["length"] == n for r in results) for n in lengths],
            "greedy_mean": mean(list(results))}
