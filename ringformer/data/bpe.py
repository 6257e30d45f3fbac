"""A small byte-level BPE for the long-context recipe, trained here from local text.

The byte tokenizer makes every retrieval match several tokens long: the first digit of a key
follows "The pass key is ", and "is " follows every filler noun too, so an induction head has
to match 4-6 bytes back before copying pays. With a BPE whose digits are single tokens,
" key is" is two tokens and each digit one; the 4-layer recipe model learned to retrieve
held-out passkeys with it in 500 steps where bytes gave nothing in 900 (docs/long_context.md).

Byte-level, so any text encodes and nothing is unknown; the `tokenizers` library (a
dependency of transformers) trains it in seconds. `ringformer.data.tokenizer.load_tokenizer`
reads the saved tokenizer.json like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD, EOS = "<pad>", "</s>"


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (PAD and EOS included, every digit its
    own token) on `texts` and save it as the tokenizer.json `out`, atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258 + 2:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges "
                         "(256 byte symbols + pad + eos)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)
    return out
