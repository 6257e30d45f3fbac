"""Passkey retrieval (Mohtashami & Jaggi 2023): can the model find a key hidden in long filler?

A prompt is an instruction, repeated filler sentences, the needle
"The pass key is {key}. Remember it." at a chosen depth of the filler, more filler, and the
question "What is the pass key? The pass key is" at the end. The answer is " {key}".
The evaluator scores either greedy decoding or the likelihood of the true key among
`candidate_keys` (no generation loop needed).

Lengths are counted in tokens of the given tokenizer (bytes for the default byte tokenizer)
and include BOS when the tokenizer has one, so `len(example.ids) <= length`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringformer.data.tokenizer import ByteTokenizer, Tokenizer

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "What is the pass key? The pass key is"

# Past this a prompt is a string of hundreds of megabytes, far beyond any context trained here;
# a mistyped length (an extra digit or three) then ends at once instead of after minutes of
# building text and a MemoryError.
MAX_LENGTH = 1 << 24


@dataclass(frozen=True)
class PasskeyExample:
    text: str            # the whole prompt, ending with QUESTION
    ids: np.ndarray      # int32 token ids of `text` ([BOS] first when the tokenizer has one)
    key: str
    answer: str          # what a perfect model continues with: " {key}"
    depth: float         # requested depth in [0, 1]
    needle_char: int     # offset of the needle sentence in `text`
    needle_token: int    # index in `ids` where the needle starts (exact for the byte tokenizer)

    @property
    def actual_depth(self) -> float:
        """Needle position as a fraction of the prompt (what a test can check)."""
        return self.needle_char / len(self.text)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_key(rng: np.random.Generator | int | None = None, digits: int = 5) -> str:
    """A key of `digits` decimal digits without a leading zero."""
    return str(int(_rng(rng).integers(10 ** (digits - 1), 10 ** digits)))


def candidate_keys(key: str, n: int, rng: np.random.Generator | int | None = None) -> list[str]:
    """`n` distinct keys with as many digits as `key`, `key` among them at a random place."""
    digits = len(key)
    if n > 9 * 10 ** (digits - 1):
        raise ValueError(f"cannot draw {n} distinct {digits}-digit keys")
    gen = _rng(rng)
    keys = {key}
    while len(keys) < n:
        keys.add(random_key(gen, digits))
    out = sorted(keys)
    gen.shuffle(out)
    return out


def _prompt(n_fill: int, depth: float, key: str) -> tuple[str, int]:
    before = round(depth * n_fill)
    head = INTRO + FILLER * before
    text = head + NEEDLE.format(key=key) + FILLER * (n_fill - before) + QUESTION
    return text, len(head)


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text)) + (tokenizer.bos_id is not None)


def bare_prompt_tokens(tokenizer: Tokenizer | None = None, key: str = "12345") -> int:
    """Tokens of a prompt with no filler at all (BOS included): the least a `length` can be."""
    return _count(tokenizer or ByteTokenizer(), _prompt(0, 0.0, key)[0])


def make_passkey_example(length: int, depth: float, *, tokenizer: Tokenizer | None = None,
                         key: str | None = None,
                         rng: np.random.Generator | int | None = None) -> PasskeyExample:
    """The longest prompt of whole filler sentences with at most `length` tokens, the needle
    after `round(depth * n)` of its `n` filler sentences. `key` defaults to 5 random digits."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if length > MAX_LENGTH:
        raise ValueError(f"length={length} is longer than the {MAX_LENGTH} tokens a prompt may have")
    tok = tokenizer or ByteTokenizer()
    key = key if key is not None else random_key(rng)
    fixed = _count(tok, _prompt(0, 0.0, key)[0])
    if fixed > length:
        raise ValueError(f"length={length} is shorter than the bare prompt ({fixed} tokens)")
    per = max(1e-9, len(tok.encode(FILLER * 16)) / 16)
    n_fill = int((length - fixed) / per) + 1
    # Subword merges make token counts slightly non-additive: step down until it fits.
    while n_fill > 0 and _count(tok, _prompt(n_fill, depth, key)[0]) > length:
        n_fill -= 1
    text, needle_char = _prompt(n_fill, depth, key)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    ids = np.asarray(bos + tok.encode(text), dtype=np.int32)
    needle_token = len(bos) + len(tok.encode(text[:needle_char]))
    return PasskeyExample(text=text, ids=ids, key=key, answer=f" {key}", depth=depth,
                          needle_char=needle_char, needle_token=needle_token)
