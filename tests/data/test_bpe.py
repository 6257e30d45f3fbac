"""The recipe's byte-level BPE (ringformer/data/bpe.py): deterministic, lossless, loadable."""

import pytest

from ringformer.data.bpe import train_bpe
from ringformer.data.tokenizer import load_tokenizer

TEXTS = ["The code of abcd is 12345. The lamp is wide. " * 20,
         "def main(self, args):\n    return self._x + 42\n" * 20,
         "A quiet river follows the old road. Every star covers a moon. " * 20]


def test_same_texts_give_the_same_file(tmp_path):
    a = train_bpe(iter(TEXTS), 300, tmp_path / "a" / "tokenizer.json")
    b = train_bpe(iter(TEXTS), 300, tmp_path / "b" / "tokenizer.json")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # written through a temporary file, then renamed


def test_round_trips_any_text_and_keeps_digits_single(tmp_path):
    tok = load_tokenizer(str(train_bpe(iter(TEXTS), 300, tmp_path / "tokenizer.json")))
    assert tok.vocab_size == 300 and tok.eos_id == 1 and tok.pad_id == 0 and tok.bos_id is None
    # Text it never saw, non-ASCII included: byte-level, so nothing is unknown or lost.
    for text in ["The pass key is 90210.", "naïve — 東京 🙂\ttabs\n", "x" * 50]:
        assert tok.decode(tok.encode(text)) == text
    # Merges learned from the repeated "12345" must not glue digits: a key is one token each.
    ids = tok.encode(" is 12345.")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("12345")
    assert len(tok.encode("The code of abcd is")) < len("The code of abcd is") / 2


def test_too_small_a_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no room for merges"):
        train_bpe(iter(TEXTS), 200, tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()
