"""Synthetic retrieval examples (ringformer/data/retrieval.py): every answer is right.

The recipe's data and its end-to-end run are tested in tests/test_longctx.py; here the
generators are checked against the text they wrote: each code a response states is the one
its record gives, so the model is never taught a wrong answer.
"""

import re

import numpy as np
import pytest

from ringformer.data import retrieval


def _records(prompt: str) -> dict[str, str]:
    found = re.findall(r"The code of (\w+) is (\d+)\. ", prompt)
    assert len(found) == len({n for n, _ in found}), "names must be unique"
    return dict(found)


@pytest.mark.parametrize("length", [400, 2000, 12000])
def test_kv_answers_are_the_records_asked_in_order(length):
    rng = np.random.default_rng(length)
    for _ in range(10):
        ex = retrieval.kv_example(rng, length)
        records = _records(ex["prompt"])
        asked = re.search(r"What are the codes of ([\w, ]+)\?", ex["prompt"]).group(1).split(", ")
        answers = re.findall(r"The code of (\w+) is (\d+)\.\n", ex["response"])
        assert [n for n, _ in answers] == asked
        assert all(records[n] == v for n, v in answers)
        assert ex["length"] <= length


def test_passkey_and_copy_answers_are_in_the_prompt():
    rng = np.random.default_rng(1)
    for n in (400, 1000, 5000):  # above the fixed intro, needle and question
        ex = retrieval.passkey_example(rng, n)
        assert ex["response"] == f" {ex['key']}." and ex["length"] <= n
        assert ex["prompt"].count(f"The pass key is {ex['key']}.") == 1
        assert not retrieval.is_heldout_key(ex["key"])
        cp = retrieval.copy_example(rng, n)
        text = cp["prompt"][len(retrieval.COPY_INTRO):-len(retrieval.COPY_QUESTION)]
        assert cp["response"] == f" {text}."


def test_mixture_follows_its_shares_and_its_seed():
    kw = dict(min_tokens=64, max_tokens=512, seed=3, shares=retrieval.REACH_SHARES)
    a = retrieval.training_examples(400, **kw)
    assert a == retrieval.training_examples(400, **kw)
    share = {t: sum(r["task"] == t for r in a) / len(a) for t in retrieval.REACH_SHARES}
    assert all(abs(share[t] - w) < 0.08 for t, w in retrieval.REACH_SHARES.items()), share
