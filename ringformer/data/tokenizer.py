"""Tokenizers: the built-in byte tokenizer (no files) or any tokenizer found on a local path.

`load_tokenizer("byte")` gives ids compatible with ByT5 (pad=0, eos=1, unk=2, byte b -> b+3,
vocab 259), so a model trained here can also be read by tools that know ByT5's ids.
`load_tokenizer(PATH)` loads a Hugging Face tokenizer directory (e.g. a LLaMA tokenizer a user
keeps on disk) or a single `tokenizer.json`. Nothing is ever downloaded: a hub name that is not
on disk is a `DataError`.

`encode` never adds special tokens; the data pipeline decides where BOS/EOS go, so the same
text gives the same ids whatever the tokenizer's own defaults are.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ringformer.errors import DataError

# The design forbids downloads at run time; these make any accidental hub call fail fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>",
              "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
# Files AutoTokenizer can build a tokenizer from; a directory with none of them is not one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                    "vocab.txt", "spiece.model")
_FIX = "pass a directory saved with tok.save_pretrained(DIR), a tokenizer.json file, or 'byte'"


def _one_line(e: Exception) -> str:
    """`e` as one line: both libraries raise messages that span several."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Tokenizer(abc.ABC):
    """What the rest of ringformer relies on; subclasses fill in the ids and the codec."""

    name: str  # saved in config.json so a run reloads the same tokenizer
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without special tokens (the data pipeline places BOS/EOS)."""

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like `encode_batch`, as int32 arrays (what the data pipeline stores)."""
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`, special tokens dropped."""

    def render_chat(self, messages: Sequence[dict]) -> tuple[str, str]:
        """(prompt, response) text of a conversation whose last message is the assistant's
        answer: the response is that answer, the prompt everything before it. Tokenizers
        without a chat template use plain `role: content` lines."""
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
        return prompt + "assistant: ", messages[-1]["content"]

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the ids could change; keys the tokenized-data cache."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 3, ByT5's id scheme. No BOS: ByT5 has none."""

    OFFSET = 3

    def __init__(self) -> None:
        self.name = "byte"
        self.vocab_size = 256 + self.OFFSET
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.bos_id = None

    @staticmethod
    def _utf8(text: str) -> bytes:
        # Lone surrogates (possible from JSON escapes) cannot be UTF-8; "?" keeps the length sane.
        return text.encode("utf-8", errors="replace")

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(self._utf8(t), dtype=np.uint8).astype(np.int32) + self.OFFSET
                for t in texts]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        a = a[(a >= self.OFFSET) & (a < self.vocab_size)]  # specials carry no text
        return (a - self.OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return "byte-v1"


class _FileTokenizer(Tokenizer):
    """Shared by the tokenizers read from files: both libraries decode the same way, and the
    files themselves identify the tokenizer (for the tokenization cache)."""

    _tok: Any
    _files: list[Path]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return _hash_files(self._files)


class _FastTokenizer(_FileTokenizer):
    """A `tokenizers.Tokenizer` read straight from a tokenizer.json (no transformers import)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        try:
            self._tok = RawTokenizer.from_file(str(path))
        except Exception as e:  # the library raises bare Exceptions for bad files
            raise DataError(f"cannot read tokenizer file {path}: {_one_line(e)}",
                            "pass a valid tokenizer.json or a tokenizer directory") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(_EOS_NAMES)
        self.bos_id = self._find(_BOS_NAMES)
        self.pad_id = self._find(_PAD_NAMES)
        self._files = [path]

    def _find(self, names: Sequence[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

class _HFTokenizer(_FileTokenizer):
    """`transformers.AutoTokenizer` from a local directory (LLaMA, GPT-2, ...)."""

    def __init__(self, path: Path) -> None:
        # Checked before transformers is asked: its message for a directory with no tokenizer
        # in it lists what it tried to convert, not what is missing.
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise DataError(f"no tokenizer.json, tokenizer.model or tokenizer_config.json in {path}",
                            _FIX)
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; all mean "not a tokenizer here"
            raise DataError(f"cannot load a tokenizer from {path}: {_one_line(e)}", _FIX) from None
        self.name = str(path)
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id
        self._files = [p for p in sorted(path.iterdir())
                       if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: Sequence[dict]) -> tuple[str, str]:
        if not getattr(self._tok, "chat_template", None):
            return super().render_chat(messages)
        # The template's own text for "everything up to the answer" is the prompt; the rest of
        # the full rendering (the answer and the template's end-of-turn marks) is the response.
        prompt = self._tok.apply_chat_template(list(messages[:-1]), tokenize=False,
                                               add_generation_prompt=True)
        full = self._tok.apply_chat_template(list(messages), tokenize=False)
        if not full.startswith(prompt):
            return super().render_chat(messages)
        return prompt, full[len(prompt):]


def _hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _finish(tok: Tokenizer, spec: str) -> Tokenizer:
    if tok.eos_id is None:
        raise DataError(f"tokenizer {spec!r} has no end-of-sequence token",
                        "packing needs one to separate documents; add an eos_token to its "
                        "tokenizer_config.json")
    if tok.pad_id is None:
        tok.pad_id = tok.eos_id  # padding is always masked out of the loss, so any id works
    return tok


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """"byte" (or empty) -> ByteTokenizer; a local directory or tokenizer.json -> its tokenizer.

    Raises DataError for anything else (never downloads).
    """
    spec = (spec or "byte").strip()
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer {spec!r} is neither 'byte' nor a local path",
                        "nothing is downloaded: save the tokenizer to a directory first "
                        "(tok.save_pretrained(DIR)) and pass that DIR, or use 'byte'")
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".json":
            raise DataError(f"tokenizer file {path} is not a tokenizer.json",
                            "pass the directory that holds it, or a tokenizer.json file")
        return _finish(_FastTokenizer(path), spec)
    try:
        return _finish(_HFTokenizer(path), spec)
    except DataError:
        # A bare directory with just tokenizer.json (no config) is still usable.
        if (path / "tokenizer.json").is_file():
            return _finish(_FastTokenizer(path / "tokenizer.json"), spec)
        raise
