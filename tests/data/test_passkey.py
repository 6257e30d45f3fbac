"""Passkey prompts: the needle sits at the requested depth, lengths hold, keys are random."""

import numpy as np
import pytest

from ringformer.data.passkey import (
    FILLER,
    MAX_LENGTH,
    NEEDLE,
    QUESTION,
    bare_prompt_tokens,
    candidate_keys,
    make_passkey_example,
)
from ringformer.data.tokenizer import load_tokenizer

TOK = load_tokenizer("byte")


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_at_requested_depth(depth):
    ex = make_passkey_example(4096, depth, tokenizer=TOK, key="48213")
    needle = NEEDLE.format(key="48213")
    assert ex.text.count(needle) == 1
    assert ex.text[ex.needle_char:].startswith(needle)
    assert ex.text.endswith(QUESTION)
    # Depth counted in filler sentences before the needle...
    before = ex.text[:ex.needle_char].count(FILLER)
    total = ex.text.count(FILLER)
    assert before == round(depth * total)
    # ...and, seen from outside, as a fraction of the prompt (intro and question are short).
    assert abs(ex.actual_depth - depth) < 0.05
    # Byte tokenizer: token offset == byte offset, and the ids are the text.
    assert ex.needle_token == len(ex.text[:ex.needle_char].encode())
    assert TOK.decode(ex.ids[ex.needle_token:ex.needle_token + len(needle)]) == needle


@pytest.mark.parametrize("length", [300, 1000, 5000])
def test_length_is_filled_but_not_exceeded(length):
    ex = make_passkey_example(length, 0.5, tokenizer=TOK, rng=0)
    assert length - len(FILLER) < len(ex.ids) <= length
    assert TOK.decode(ex.ids) == ex.text
    assert ex.answer == f" {ex.key}"


def test_random_keys_are_reproducible_and_candidates_distinct():
    a = make_passkey_example(500, 0.3, rng=np.random.default_rng(1))
    b = make_passkey_example(500, 0.3, rng=np.random.default_rng(1))
    c = make_passkey_example(500, 0.3, rng=np.random.default_rng(2))
    assert a.key == b.key and a.text == b.text
    assert a.key != c.key
    assert len(a.key) == 5 and a.key.isdigit()
    cands = candidate_keys(a.key, 10, rng=0)
    assert len(cands) == len(set(cands)) == 10
    assert a.key in cands
    assert all(len(k) == 5 and k.isdigit() for k in cands)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        make_passkey_example(1000, 1.5)
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        make_passkey_example(20, 0.5)


def test_length_bounds():
    """bare_prompt_tokens is the exact least length (scripts check options with it), and a
    length past MAX_LENGTH is refused before any text is built."""
    least = bare_prompt_tokens()
    assert len(make_passkey_example(least, 0.5, rng=0).ids) == least
    with pytest.raises(ValueError, match="shorter than the bare prompt"):
        make_passkey_example(least - 1, 0.5, rng=0)
    with pytest.raises(ValueError, match=f"longer than the {MAX_LENGTH} tokens"):
        make_passkey_example(10_000_000_000, 0.5, rng=0)


def test_tokenizer_with_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([FILLER * 3, NEEDLE, QUESTION], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ex = make_passkey_example(400, 0.5, tokenizer=tok, key="12345")
    assert ex.ids[0] == tok.bos_id
    assert len(ex.ids) <= 400
    assert ex.ids[1:].tolist() == tok.encode(ex.text)
