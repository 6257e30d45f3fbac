"""Passkey retrieval scoring: prompts of several lengths x depths, an accuracy table (plots.py draws it).

Prompts come from `ringformer.data.passkey` (the data pipeline's generator). Each prompt is scored
two ways from the same teacher-forced scores of its candidate keys; the evaluation tool gets
them from generation (`ringformer.generate.score`: one prefill per prompt, then each candidate
fed as a few decode steps from the shared KV cache, instead of a full forward per candidate):

- greedy: the argmax at every answer position, given the true answer's prefix, must be the
  answer token. This is exactly "greedy decoding reproduces the key": if every argmax matches,
  greedy decoding walks the same prefix and emits the key; at the first mismatch greedy
  decoding emits that wrong token. `predicted` shows the teacher-forced argmaxes, which equal
  the greedy output up to and including its first wrong token.
- rank: the true key's total log-likelihood must be strictly higher than that of every other
  candidate key (same number of digits); a tie counts as a miss.

This module knows nothing about JAX: it takes a `scorer(rows) -> [(logprobs, argmax)]` over
rows `(ids, answer_start)`, so tests can plant right and wrong answers with a fake model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ringformer.data.passkey import (
    PasskeyExample,
    bare_prompt_tokens,
    candidate_keys,
    make_passkey_example,
    random_key,
)
from ringformer.data.tokenizer import Tokenizer

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEY_DIGITS = 5  # random_key's default, which make_tasks uses
MAX_CANDIDATES = 9 * 10 ** (KEY_DIGITS - 1)  # every key of that many digits

# rows (ids, answer_start) -> per row (log p of ids[answer_start:], argmax predictions there)
Scorer = Callable[[Sequence[tuple[np.ndarray, int]]], list[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass
class Task:
    length: int                      # requested prompt + answer length (tokens)
    example: PasskeyExample
    candidates: list[str]
    rows: list[tuple[np.ndarray, int]]  # one (prompt + " key", answer_start) per candidate
    truth: int                       # index of the true key in `candidates`


def answer_ids(tokenizer: Tokenizer, prompt_text: str, prompt_ids: np.ndarray,
               answer: str) -> np.ndarray:
    """Token ids that follow `prompt_ids` when the text continues with `answer`.

    Encoding prompt + answer together catches merges a subword tokenizer makes across the
    boundary; if the prompt's own ids change that way, the answer is encoded alone instead.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    full = np.asarray(bos + tokenizer.encode(prompt_text + answer), np.int32)
    n = len(prompt_ids)
    if len(full) > n and np.array_equal(full[:n], prompt_ids):
        return full[n:]
    return np.asarray(tokenizer.encode(answer), np.int32)


def make_tasks(tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], *,
               trials: int = 1, n_candidates: int = 8, seed: int = 0) -> list[Task]:
    """`trials` prompts per (length, depth), each with `n_candidates` keys (the true one too).

    Raises ValueError when a length cannot hold the bare prompt and its answer.
    """
    rng = np.random.default_rng(seed)
    tasks = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = random_key(rng)
                room = len(tokenizer.encode(f" {key}")) + 2  # +2: boundary merges, slack
                ex = make_passkey_example(length - room, depth, tokenizer=tokenizer, key=key)
                cands = candidate_keys(key, n_candidates, rng)
                rows = []
                for c in cands:
                    ans = answer_ids(tokenizer, ex.text, ex.ids, f" {c}")
                    ids = np.concatenate([ex.ids, ans]).astype(np.int32)
                    if len(ids) > length:
                        raise ValueError(f"passkey prompt of {len(ids)} tokens exceeds {length}")
                    rows.append((ids, len(ex.ids)))
                tasks.append(Task(length, ex, cands, rows, cands.index(key)))
    return tasks


def min_length(tokenizer: Tokenizer) -> int:
    """Fewest tokens `make_tasks` can fit a prompt and its answer into (no filler): the bare
    prompt plus the room it keeps for the answer. Exact for the byte tokenizer, whose keys all
    take the same number of tokens."""
    key = "1" * KEY_DIGITS
    return bare_prompt_tokens(tokenizer, key) + len(tokenizer.encode(f" {key}")) + 2


def default_lengths(context: int, tokenizer: Tokenizer) -> list[int]:
    """context/8, /4, /2 and context itself, keeping those that hold a prompt."""
    out = []
    for n in sorted({max(1, context // 8), max(1, context // 4), max(1, context // 2), context}):
        try:
            make_tasks(tokenizer, [n], [0.0], n_candidates=1)
        except ValueError:
            continue
        out.append(n)
    return out


def score_tasks(tasks: Sequence[Task], scorer: Scorer, tokenizer: Tokenizer) -> list[dict]:
    """One result per task: greedy and rank verdicts, the key, what the model predicted."""
    rows = [row for t in tasks for row in t.rows]
    scores = scorer(rows)
    out, k = [], 0
    for t in tasks:
        mine = scores[k:k + len(t.rows)]
        k += len(t.rows)
        totals = np.array([float(np.sum(lp)) for lp, _ in mine])
        ids, start = t.rows[t.truth]
        best = np.asarray(mine[t.truth][1])
        others = np.delete(totals, t.truth)
        out.append({
            "length": t.length, "prompt_tokens": len(t.example.ids),
            "depth": t.example.depth, "needle_token": t.example.needle_token,
            "key": t.example.key, "predicted": tokenizer.decode(best),
            "greedy": bool(np.array_equal(best, ids[start:])),
            "rank_first": bool(others.size == 0 or totals[t.truth] > others.max()),
            "true_logprob": float(totals[t.truth]),
            "best_other_logprob": float(others.max()) if others.size else None,
        })
    return out


def accuracy_table(results: Sequence[dict], lengths: Sequence[int],
                   depths: Sequence[float]) -> dict:
    """[length][depth] accuracies for both scorings, plus their means over all prompts."""
    def grid(field: str) -> list[list[float]]:
        return [[float(np.mean([r[field] for r in results
                                if r["length"] == n and r["depth"] == d]))
                 for d in depths] for n in lengths]

    return {"lengths": list(lengths), "depths": list(depths),
            "greedy_accuracy": grid("greedy"), "rank_accuracy": grid("rank_first"),
            "greedy_mean": float(np.mean([r["greedy"] for r in results])),
            "rank_mean": float(np.mean([r["rank_first"] for r in results]))}


def run_passkey(scorer: Scorer, tokenizer: Tokenizer, lengths: Sequence[int],
                depths: Sequence[float] = DEPTHS, *, trials: int = 1, n_candidates: int = 8,
                seed: int = 0, tasks: Sequence[Task] | None = None) -> dict:
    """The whole passkey evaluation: the accuracy table plus every prompt's result.

    `tasks`, if given, are `make_tasks` of the same arguments, built earlier so that a length
    that cannot hold a prompt is refused before a long evaluation rather than after it.
    """
    if tasks is None:
        tasks = make_tasks(tokenizer, lengths, depths, trials=trials,
                           n_candidates=n_candidates, seed=seed)
    results = score_tasks(tasks, scorer, tokenizer)
    return {**accuracy_table(results, lengths, depths), "trials": trials,
            "candidates": n_candidates,
            "scoring": "greedy: teacher-forced argmax equals every answer token (same verdict "
                       "as greedy decoding); rank: true key has the highest total "
                       "log-likelihood among the candidates",
            "examples": results}
