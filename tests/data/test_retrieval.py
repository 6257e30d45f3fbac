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


def test_noise_passkeys_hide_the_key_in_a_repeated_block_of_nonsense():
    """Nonsense filler: the training passkey's intro, needle and question around a block of
    3-6 sentences of random words repeated, none of them a word of the benchmark's prompt
    or of the training sentences, a new block in every example; the answer is right."""
    from ringformer.data import passkey

    rng = np.random.default_rng(5)
    real = retrieval.BENCHMARK_WORDS | {w for t in (retrieval.NOUNS, retrieval.ADJECTIVES,
                                                   retrieval.VERBS) for w in t}
    blocks = set()
    for n in (400, 1000, 5000):
        ex = retrieval.noise_passkey_example(rng, n)
        assert ex["task"] == "passkey_noise" and ex["length"] <= n
        assert ex["response"] == f" {ex['key']}." and not retrieval.is_heldout_key(ex["key"])
        assert ex["prompt"].startswith(passkey.INTRO) and ex["prompt"].endswith(passkey.QUESTION)
        needle = passkey.NEEDLE.format(key=ex["key"])
        assert ex["prompt"].count(needle) == 1
        body = ex["prompt"][len(passkey.INTRO):-len(passkey.QUESTION)].replace(needle, "")
        said = body.split(". ")[:-1]
        block = said[:said.index(said[0], 1)]  # the block ends where its first sentence recurs
        assert 3 <= len(block) <= 6 and said == (block * n)[:len(said)]
        words = " ".join(block).lower().split()
        assert all(3 <= len(w) <= 7 and w.isalpha() for w in words)
        assert not set(words) & real
        blocks.add(tuple(block))
    assert len(blocks) == 3


def test_heldout_passkey_examples_are_the_benchmarks_prompts():
    """The probe's held-out passkeys: the benchmark's filler (never training sentences) and
    held-out keys, the needle once, the length kept; never among the training tasks."""
    from ringformer.data import passkey

    rng = np.random.default_rng(3)
    depths = []
    for n in (300, 1000, 5000):
        ex = retrieval.heldout_passkey_example(rng, n)
        assert ex["response"] == f" {ex['key']}." and retrieval.is_heldout_key(ex["key"])
        assert ex["prompt"].count(f"The pass key is {ex['key']}.") == 1
        body = ex["prompt"][len(passkey.INTRO):-len(passkey.QUESTION)]
        body = body.replace(passkey.NEEDLE.format(key=ex["key"]), "")
        assert body == passkey.FILLER * (len(body) // len(passkey.FILLER))
        assert ex["length"] <= n or n == 300  # 300 is under the bare prompt: no filler
        depths.append(ex["depth"])
    assert len(set(depths)) == 3 and "heldout_passkey" not in retrieval.TASKS


def test_mixture_follows_its_shares_and_its_seed():
    kw = dict(min_tokens=64, max_tokens=512, seed=3, shares=retrieval.REACH_SHARES)
    a = retrieval.training_examples(400, **kw)
    assert a == retrieval.training_examples(400, **kw)
    share = {t: sum(r["task"] == t for r in a) / len(a) for t in retrieval.REACH_SHARES}
    assert all(abs(share[t] - w) < 0.08 for t, w in retrieval.REACH_SHARES.items()), share


def _word_tokenizer():
    """A tokenizer whose vocabulary is known: bytes, plus ' zebra' and ' house' (a filler
    noun) as single tokens."""
    from ringformer.data.tokenizer import ByteTokenizer

    extra = {300: " zebra", 301: " house"}

    class Words(ByteTokenizer):
        def decode(self, ids):
            return "".join(extra.get(int(i)) or ByteTokenizer.decode(self, [i]) for i in ids)

        def encode(self, text):
            for i, w in extra.items():
                if text == w:
                    return [i]
            return ByteTokenizer.encode(self, text)

    return Words()


def test_one_token_words_are_single_tokens_and_never_filler():
    words = retrieval.one_token_words(_word_tokenizer(), 302)
    assert words == ["zebra"]  # " house" is one token but a filler noun; bytes are no words


def test_gap_copy_answers_the_list_from_a_varying_distance():
    rng = np.random.default_rng(4)
    words = ["alpha", "bravo", "delta", "kilo", "oscar"]
    gaps, places = set(), set()
    for _ in range(40):
        ex = retrieval.gap_copy_example(rng, 1500, words=words)
        listed = ex["prompt"].removeprefix(retrieval.GAP_COPY_INTRO).split(".\n")[0]
        assert ex["response"] == f" {listed}." and ex["length"] <= 1500
        items = listed.split(" ")
        assert 4 <= len(items) <= 24
        # One number, as in a passkey, anywhere in the list; every other item a word.
        assert sum(w.isdigit() and len(w) == 5 for w in items) == 1
        assert sum(w in words for w in items) == len(items) - 1
        places.add(next(i for i, w in enumerate(items) if w.isdigit()))
        assert ex["prompt"].endswith(retrieval.GAP_COPY_QUESTION)
        gaps.add(len(ex["prompt"]) - len(retrieval.GAP_COPY_INTRO) - len(listed))
    assert len(gaps) > 30  # the distance to the list is not a constant the model could learn
    assert {0, 3} <= places and max(places) > 5


def test_gap_copies_need_words():
    with pytest.raises(ValueError, match="gap copies need words"):
        retrieval.training_examples(3, min_tokens=32, max_tokens=64, seed=0,
                                    shares={"gap_copy": 1.0})
    ex = retrieval.training_examples(20, min_tokens=32, max_tokens=256, seed=0,
                                     shares={"gap_copy": 0.5, "passkey": 0.5}, words=["zebra"])
    assert {e["task"] for e in ex} == {"gap_copy", "passkey"}


def test_gap_copy_files_need_the_bpe(tmp_path):
    with pytest.raises(ValueError, match="need a BPE"):
        retrieval.build_retrieval_files(
            tmp_path, examples=1, long_examples=0, min_tokens=256, max_tokens=300,
            long_max_tokens=512, heldout_lengths=[512], heldout_depths=[0.0],
            heldout_per_length=1, seed=0, rung_examples=1)
    assert not list(tmp_path.iterdir())  # refused before anything was written
