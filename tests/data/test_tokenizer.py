"""Tokenizers: the byte tokenizer's ids and round trip, local tokenizer files, no downloads."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import DataError

TEXTS = ["hello world", "naïve café — ünïcødé ✓", "emoji 🙂 and 中文", "", "tabs\tand\nnewlines"]


def test_byte_round_trip_and_ids():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id, tok.name) == (259, 0, 1, None,
                                                                               "byte")
    assert tok.encode("a") == [ord("a") + 3]
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8"))
        assert all(3 <= i < 259 for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # Specials carry no text.
    assert tok.decode([tok.pad_id, *tok.encode("ab"), tok.eos_id, 2]) == "ab"


def test_byte_ids_match_byt5():
    from transformers import ByT5Tokenizer

    ref = ByT5Tokenizer()
    tok = load_tokenizer("byte")
    assert (ref.pad_token_id, ref.eos_token_id, ref.unk_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def _train_tokenizer(path, *, with_specials=True):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<s>", "</s>", "<pad>"] if with_specials else ["<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return tok


def test_local_tokenizer_json_file_and_directory(tmp_path):
    raw = _train_tokenizer(tmp_path / "tokenizer.json")
    for spec in (tmp_path / "tokenizer.json", tmp_path):
        tok = load_tokenizer(str(spec))
        assert tok.vocab_size == raw.get_vocab_size()
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
        ids = tok.encode("the lazy fox")
        assert ids == raw.encode("the lazy fox", add_special_tokens=False).ids
        assert tok.decode(ids) == "the lazy fox"
        # The saved name reloads the same tokenizer (it goes into config.json).
        assert load_tokenizer(tok.name).encode("the lazy fox") == ids


def test_saved_pretrained_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    raw = _train_tokenizer(tmp_path / "raw.json")
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode_batch(["the dog", "a fox"]) == [
        raw.encode(t, add_special_tokens=False).ids for t in ["the dog", "a fox"]]


def test_hub_name_is_an_error_not_a_download():
    with pytest.raises(DataError, match="neither 'byte' nor a local path") as e:
        load_tokenizer("meta-llama/Llama-2-7b-hf")
    assert "nothing is downloaded" in e.value.fix


def test_tokenizer_without_eos_is_an_error(tmp_path):
    _train_tokenizer(tmp_path / "tokenizer.json", with_specials=False)
    with pytest.raises(DataError, match="no end-of-sequence token"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer file"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.model").write_text("x")
    with pytest.raises(DataError, match=r"not a tokenizer\.json"):
        load_tokenizer(str(tmp_path / "vocab.model"))


def test_directory_without_a_tokenizer_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(DataError, match=r"no tokenizer\.json, tokenizer\.model or "
                                        r"tokenizer_config\.json in ") as e:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value) and "save_pretrained" in e.value.fix
    # A config with nothing to build from: transformers' several-line reason, on one line.
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="cannot load a tokenizer from") as e:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)
