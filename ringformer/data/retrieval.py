"""Synthetic retrieval examples for the long-context recipe (configs/longctx_*.py).

Tasks written as supervised examples (`prompt`, `response`): the loss is on the response
only, so a handful of answer tokens is not drowned by thousands of predictable filler tokens
(trained on whole documents, small models answer the same key for every prompt):

- passkey: the prompt of `ringformer.data.passkey` (its intro, needle and question), but the
  haystack is made of `sentences` (never `passkey.FILLER`) and the key is a training key;
- passkey_noise: the same on `nonsense_sentences`, a repeated block of random words that
  the BPE splits into rare pieces, so the model learns to look past thousands of keys it
  has never seen (as the benchmark's filler is to it);
- key-value lookup: many "The code of NAME is VALUE." records scattered through filler, then
  the names to look up; the response states every asked code, so one example carries dozens
  of retrieval targets instead of one;
- copy: random words and numbers, then the same text again: every response token is a
  retrieval target, which is what makes the copying circuits form within minutes;
- gap copy: a list of one-token words and numbers, a random stretch of filler, then the list
  again. The list's distance from the question changes in every example, so only copying by
  content scores (plain copies can be, and are, learnt by place); with smeared keys
  (`model.smear_keys`) it forms, without them it did not (docs/long_context.md). It needs
  the words (`one_token_words` of the tokenizer), so it is not among `TASKS`.

Held-out prompts (`heldout_passkey`) are the evaluation's: `passkey.FILLER` and keys of the
held-out share of the key space (`is_heldout_key`), so neither filler nor key was trained on.
`heldout_passkey_example` makes one as a supervised example, for probes; it is no training
task either.

The generators count characters; `training_examples` turns token lengths into characters
with a measured `chars_per_token` (1 for the byte tokenizer, whose ASCII bytes are tokens).
`build_retrieval_files` can train the recipe's BPE (`ringformer.data.bpe`) first, on the
training corpus and training examples only, and then sizes everything in its tokens.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ringformer.data.passkey import (
    FILLER,
    INTRO,
    NEEDLE,
    QUESTION,
    bare_prompt_tokens,
    make_passkey_example,
)
from ringformer.data.tokenizer import ByteTokenizer, Tokenizer
from ringformer.errors import ConfigError

# Words of the training haystack. The evaluation's filler ("The grass is green. The sky is
# blue. The sun is yellow. Here we go. There and back again.") uses none of its nouns or
# colours, so the held-out prompts' haystack is text the model never saw.
NOUNS = ("house", "river", "stone", "bird", "cat", "road", "tree", "door", "cloud", "ship",
         "lamp", "bread", "chair", "field", "hill", "book", "wind", "rain", "star", "moon",
         "horse", "garden", "window", "letter", "bridge", "candle", "forest", "island")
ADJECTIVES = ("red", "tall", "quiet", "cold", "old", "warm", "small", "dark", "bright",
              "round", "soft", "heavy", "empty", "narrow", "wide", "silent", "wet", "calm")
VERBS = ("sees", "follows", "finds", "moves", "holds", "watches", "passes", "covers")
TEMPLATES = ("The {n} is {a}. ", "A {a} {n} {v} the {m}. ", "Every {n} {v} a {m}. ",
             "The {m} near the {n} is {a}. ")
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
# Nonsense filler never spells a word of the benchmark's prompt.
BENCHMARK_WORDS = frozenset(re.findall(r"[a-z]+", (INTRO + FILLER + NEEDLE + QUESTION).lower()))
KV_INTRO = "Below are secret codes hidden in a long text. Find them; you will be asked for some.\n"
KV_RECORD = "The code of {name} is {value}. "
KV_QUESTION = "\nWhat are the codes of {names}?\n"
KV_ANSWER = "The code of {name} is {value}.\n"
COPY_INTRO = "Read this text carefully, then write it again exactly.\n"
COPY_QUESTION = "\nThe same text again:"
HELDOUT_SHARE = 10  # one key in this many is held out of training


def is_heldout_key(key: str) -> bool:
    """The held-out share of the key space: a stable hash, the same on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % HELDOUT_SHARE == 0


def draw_key(rng: np.random.Generator, heldout: bool = False, digits: int = 5) -> str:
    """A key without a leading zero from the training (or the held-out) share."""
    while True:
        key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        if is_heldout_key(key) == heldout:
            return key


def sentences(rng: np.random.Generator, n_chars: int) -> list[str]:
    """Training filler sentences, about n_chars characters in all (never more)."""
    out, total = [], 0
    while True:
        t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        n, m = rng.choice(len(NOUNS), 2, replace=False)
        s = t.format(n=NOUNS[n], m=NOUNS[m], a=ADJECTIVES[int(rng.integers(len(ADJECTIVES)))],
                     v=VERBS[int(rng.integers(len(VERBS)))])
        if total + len(s) > n_chars:
            return out
        out.append(s)
        total += len(s)


def log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    """A length in [low, high], log-uniform: as many short examples as long ones per octave."""
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def _nonsense_word(rng: np.random.Generator) -> str:
    while True:
        word = "".join(LETTERS[rng.integers(len(LETTERS), size=int(rng.integers(3, 8)))])
        if word not in BENCHMARK_WORDS:
            return word


def nonsense_sentences(rng: np.random.Generator, n_chars: int) -> list[str]:
    """Filler shaped like the benchmark's and made of nothing the model reads elsewhere:
    a block of 3-6 sentences of 2-5 random 3-7-letter words (the benchmark's own words
    excluded), repeated, about n_chars characters in all (never more). The BPE splits such
    words into its rare pieces, as it splits the benchmark's unseen nouns."""
    block = [" ".join(_nonsense_word(rng) for _ in range(int(rng.integers(2, 6)))).capitalize()
             + ". " for _ in range(int(rng.integers(3, 7)))]
    out, total = [], 0
    while True:
        for s in block:
            if total + len(s) > n_chars:
                return out
            out.append(s)
            total += len(s)


def passkey_example(rng: np.random.Generator, length: int, *,
                    filler: Callable[[np.random.Generator, int], list[str]] = sentences,
                    task: str = "passkey") -> dict:
    """A supervised passkey example of at most `length` tokens (EOS included), needle at a
    uniformly random depth of `filler` (training sentences by default)."""
    key = draw_key(rng)
    needle = NEEDLE.format(key=key)
    response = f" {key}."
    room = length - len(INTRO) - len(needle) - len(QUESTION) - len(response) - 1
    fill = filler(rng, max(0, room))
    depth = float(rng.uniform())
    cut = round(depth * len(fill))
    prompt = INTRO + "".join(fill[:cut]) + needle + "".join(fill[cut:]) + QUESTION
    return {"prompt": prompt, "response": response, "task": task, "key": key,
            "depth": cut / max(1, len(fill)), "length": len(prompt) + len(response) + 1}


# Passkeys on nonsense filler: keys the model has never seen, by the thousand, around the
# needle, as in the benchmark's prompts. With training filler alone greedy retrieval of
# held-out prompts stopped at 2K (28% over 1-16K); with half the passkeys on this it reached
# 4K-8K (51%; docs/long_context.md).
noise_passkey_example = functools.partial(passkey_example, filler=nonsense_sentences,
                                          task="passkey_noise")


def _names(rng: np.random.Generator, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(LETTERS, 4)))
    # Sorted before shuffling: a set's order follows the per-process string hash seed, so
    # shuffling it directly gave different examples from the same seed in each process.
    return [str(x) for x in rng.permutation(sorted(names))]


def kv_example(rng: np.random.Generator, length: int, *, density: int = 96,
               max_queries: int = 8) -> dict:
    """A supervised key-value lookup example of at most `length` tokens: about one record
    per `density` characters of text, up to `max_queries` of them asked (a random subset, in
    random order), the response stating each asked code."""
    n_pairs = max(2, length // density)
    n_query = int(rng.integers(1, min(max_queries, n_pairs) + 1))
    while True:
        names = _names(rng, n_pairs)
        values = [draw_key(rng) for _ in names]
        asked = [int(i) for i in rng.choice(n_pairs, n_query, replace=False)]
        records = [KV_RECORD.format(name=n, value=v) for n, v in zip(names, values, strict=True)]
        question = KV_QUESTION.format(names=", ".join(names[i] for i in asked))
        response = "".join(KV_ANSWER.format(name=names[i], value=values[i]) for i in asked)
        fixed = len(KV_INTRO) + sum(map(len, records)) + len(question) + len(response) + 1
        if fixed <= length or n_pairs == 2:
            break
        n_pairs, n_query = max(2, n_pairs // 2), max(1, min(n_query, n_pairs // 2))
    fill = sentences(rng, max(0, length - fixed))
    # Records at random places among the filler sentences, in their own order.
    slots = np.sort(rng.integers(0, len(fill) + 1, len(records)))
    parts, j = [], 0
    for i, s in enumerate([*fill, ""]):
        while j < len(records) and slots[j] == i:
            parts.append(records[j])
            j += 1
        parts.append(s)
    prompt = KV_INTRO + "".join(parts) + question
    return {"prompt": prompt, "response": response, "task": "kv", "queries": n_query,
            "length": len(prompt) + len(response) + 1}


def copy_example(rng: np.random.Generator, length: int) -> dict:
    """A supervised copy example of at most `length` tokens: random words and numbers, then
    the same text again as the response. Every response token after the first is "what came
    after X" one position back: the densest signal for the induction (copying) heads that
    retrieval needs, which small models do not form from a few answers per thousand tokens."""
    words, total = [], 0
    budget = max(8, (length - len(COPY_INTRO) - len(COPY_QUESTION) - 3) // 2)
    while True:
        w = (draw_key(rng) if rng.uniform() < 0.3 else
             "".join(rng.choice(LETTERS, int(rng.integers(2, 8)))))
        if total + len(w) + 1 > budget:
            break
        words.append(w)
        total += len(w) + 1
    text = " ".join(words) or "a"
    prompt = COPY_INTRO + text + COPY_QUESTION
    return {"prompt": prompt, "response": f" {text}.", "task": "copy",
            "length": len(prompt) + len(text) + 3}


GAP_COPY_INTRO = "Read this list, then write it again exactly.\n"
GAP_COPY_QUESTION = "\nThe same list again:"


def one_token_words(tok: Tokenizer, vocab_size: int) -> list[str]:
    """Words of 2+ letters the tokenizer writes as one token after a space, the haystack's
    nouns, adjectives and verbs excluded (an item to copy should name one place in its
    prompt; the templates' few function words, "the", "is", remain)."""
    filler = {w for t in (NOUNS, ADJECTIVES, VERBS) for w in t}
    words = []
    for i in range(vocab_size):
        s = tok.decode([i])
        if len(s) > 2 and s[0] == " " and s[1:].isalpha() and s[1:].lower() not in filler \
                and tok.encode(s) == [i]:
            words.append(s[1:])
    return sorted(set(words))


def gap_copy_example(rng: np.random.Generator, length: int, *, words: Sequence[str]) -> dict:
    """A supervised gap-copy example of at most `length` characters: 4-24 items, all of them
    `words` but one 5-digit number at a random place, filler of a random share of the room
    left, the question; the response is the list again."""
    # One number, as in a passkey: a digit then names one place in the list more often than
    # not, so copying digit after digit pays from the first steps. With a number in every
    # fifth item (three a list), a digit named several places and the copying of digits
    # formed in one warm-up of three (docs/long_context.md).
    items = [words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(3, 24)))]
    items.insert(int(rng.integers(len(items) + 1)), draw_key(rng))
    text = " ".join(items)
    fixed = len(GAP_COPY_INTRO) + 2 * len(text) + len(GAP_COPY_QUESTION) + 5
    gap = "".join(sentences(rng, int(rng.uniform() * max(0, length - fixed))))
    prompt = GAP_COPY_INTRO + text + ".\n" + gap + GAP_COPY_QUESTION
    return {"prompt": prompt, "response": f" {text}.", "task": "gap_copy",
            "length": len(prompt) + len(text) + 3}


TASKS = {"passkey": passkey_example, "passkey_noise": noise_passkey_example, "kv": kv_example,
         "copy": copy_example}
# Shares of the examples: copying first forms the circuits; passkey is what is evaluated.
DEFAULT_SHARES = {"passkey": 0.4, "kv": 0.2, "copy": 0.4}
# Past the warm-up, shares that keep the retrieval answers from drowning: a copy example's
# response is half its length, so at 40% of 1-4K-token examples copies were 95% of the
# answer tokens and passkeys under 1%.
# Half the passkeys are on nonsense filler.
REACH_SHARES = {"passkey": 0.25, "passkey_noise": 0.25, "kv": 0.4, "copy": 0.1}
# The rung between the gap-copy warm-up and stage 1 (configs/longctx_rung.py): the retrieval
# tasks join the copying that formed, at lengths up to 512 tokens.
RUNG_SHARES = {"gap_copy": 0.3, "passkey": 0.2, "passkey_noise": 0.2, "kv": 0.3}


def training_examples(n: int, *, min_tokens: int, max_tokens: int, seed: int,
                      shares: dict[str, float] | None = None,
                      chars_per_token: dict[str, float] | None = None,
                      desc: str = "retrieval examples",
                      words: Sequence[str] | None = None) -> list[dict]:
    """`n` examples of the TASKS in proportion to `shares`, lengths log-uniform in
    [min_tokens, max_tokens] tokens, of `chars_per_token[task]` characters each (default 1,
    bytes; a record's `length` counts characters); the same seed gives the same examples.
    A "gap_copy" share needs `words` (`one_token_words`)."""
    cpt = chars_per_token or {}
    shares = shares or DEFAULT_SHARES
    names = sorted(shares)
    tasks = dict(TASKS)
    if "gap_copy" in shares:
        if not words:
            raise ValueError("gap copies need words: pass one_token_words(tokenizer, vocab)")
        tasks["gap_copy"] = functools.partial(gap_copy_example, words=words)
    p = np.array([shares[k] for k in names], float)
    rng = np.random.default_rng(seed)
    out = []
    for _ in tqdm(range(n), desc=desc, unit="ex", leave=False):
        length = log_uniform(rng, min_tokens, max_tokens)
        task = names[int(rng.choice(len(names), p=p / p.sum()))]
        out.append(tasks[task](rng, max(1, round(length * cpt.get(task, 1.0)))))
    return out


def heldout_passkey(lengths: Sequence[int], depths: Sequence[float], per_length: int, *,
                    seed: int, tokenizer: Tokenizer | None = None) -> list[dict]:
    """Evaluation prompts: `per_length` per length, depths taken in turn; the standard filler
    and held-out keys. `length` bounds prompt + answer in tokens of `tokenizer` (bytes by
    default); the answer needs the tokens of " KEY" and 2 more."""
    tok = tokenizer or ByteTokenizer()
    rng = np.random.default_rng(seed)
    out = []
    for n in tqdm(lengths, desc="held-out passkey prompts", unit="length", leave=False):
        for i in range(per_length):
            key = draw_key(rng, heldout=True)
            depth = float(depths[i % len(depths)])
            room = len(tok.encode(f" {key}")) + 2
            ex = make_passkey_example(int(n) - room, depth, key=key, tokenizer=tok)
            out.append({"prompt": ex.text, "key": key, "answer": ex.answer, "length": int(n),
                        "depth": depth, "needle_char": ex.needle_char})
    return out


def heldout_passkey_example(rng: np.random.Generator, length: int) -> dict:
    """A held-out prompt (`heldout_passkey`'s filler and keys) as a supervised example of at
    most `length` characters, or the bare prompt's if that is more, the needle at a uniformly
    random depth: a probe's reading of the evaluation's own distribution."""
    key = draw_key(rng, heldout=True)
    response = f" {key}."
    room = max(length - len(response) - 1, bare_prompt_tokens(key=key))
    ex = make_passkey_example(room, float(rng.uniform()), key=key)  # bytes: one per character
    return {"prompt": ex.text, "response": response, "task": "heldout_passkey", "key": key,
            "depth": ex.depth, "length": len(ex.text) + len(response) + 1}


def _recipe_tokenizer(out: Path, vocab_size: int, corpus: Path | None, *, max_tokens: int,
                      seed: int) -> tuple[Tokenizer, dict[str, float], list[str]]:
    """The tokenizer the examples are sized in, its measured characters per token on
    training examples of each task, and its `one_token_words` for gap copies: bytes (1 each,
    no words), or a BPE of `vocab_size` trained on the `corpus` jsonl's texts and a sample of
    training examples (never held-out text), saved as tokenizer.json. Per task, since random
    copy text packs 2-3x fewer characters into a token than the filler sentences do."""
    import json

    from ringformer.data.bpe import train_bpe
    from ringformer.data.tokenizer import load_tokenizer

    if not vocab_size:
        return ByteTokenizer(), {}, []
    records = training_examples(2000, min_tokens=64, max_tokens=max_tokens, seed=seed + 3,
                                desc="tokenizer sample")

    def texts():
        if corpus is not None:
            with open(corpus, encoding="utf-8") as f:
                yield from (json.loads(line)["text"] for line in f if line.strip())
        yield from (r["prompt"] + r["response"] for r in records)

    tok = load_tokenizer(str(train_bpe(texts(), vocab_size, out / "tokenizer.json")))
    words = one_token_words(tok, vocab_size)
    # Gap copies are drawn from the tokenizer's own words, so they are measured after it;
    # so is nonsense filler, kept out of the BPE's sample so that its merges are those of
    # real words (as the benchmark's filler meets them: split into rare pieces).
    if words:
        records += training_examples(500, min_tokens=64, max_tokens=max_tokens, seed=seed + 5,
                                     shares={"gap_copy": 1.0}, words=words,
                                     desc="tokenizer sample")
    records += training_examples(300, min_tokens=64, max_tokens=max_tokens, seed=seed + 8,
                                 shares={"passkey_noise": 1.0}, desc="tokenizer sample")
    sample = [r["prompt"] + r["response"] for r in records]
    chars, tokens = {}, {}
    for r, text, ids in zip(records, sample, tok.encode_batch(sample), strict=True):
        chars[r["task"]] = chars.get(r["task"], 0) + len(text)
        tokens[r["task"]] = tokens.get(r["task"], 0) + len(ids)
    return tok, {t: chars[t] / tokens[t] for t in sorted(chars)}, words


def _examples(n: int, span: tuple[int, int], seed: int, desc: str, **kwargs) -> list[dict]:
    return training_examples(n, min_tokens=span[0], max_tokens=span[1], seed=seed, desc=desc,
                             **kwargs) if n else []


def build_retrieval_files(out_dir: str | Path, *, examples: int, long_examples: int,
                          min_tokens: int, max_tokens: int, long_max_tokens: int,
                          heldout_lengths: Sequence[int], heldout_depths: Sequence[float],
                          heldout_per_length: int, seed: int, warmup_examples: int = 0,
                          warmup_tokens: tuple[int, int] = (16, 128), gap_copy_examples: int = 0,
                          gap_copy_tokens: tuple[int, int] = (32, 256), rung_examples: int = 0,
                          rung_tokens: tuple[int, int] = (32, 512), vocab_size: int = 0,
                          corpus: str | Path | None = None, force: bool = False) -> dict:
    """`out_dir/{train_gap_copy,train_rung,train_warmup,train_short,train_long,
    heldout_passkey}.jsonl` (and with a `vocab_size`, the BPE `tokenizer.json` they are sized
    in), rebuilt only when the arguments or the corpus change. Gap copies span
    `gap_copy_tokens`, rung examples (`RUNG_SHARES`) `rung_tokens`, warm-up examples
    `warmup_tokens`, short ones [min_tokens, max_tokens], long ones (max_tokens,
    long_max_tokens]. Gap copies need the BPE's words: ValueError without a `vocab_size`."""
    from ringformer.data.corpus import _signature, _up_to_date, _write_jsonl, _write_manifest

    if (gap_copy_examples or rung_examples) and not vocab_size:
        raise ValueError("gap copies are lists of one-token words: they need a BPE vocab_size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(corpus) if corpus is not None and vocab_size else None
    args = [8, examples, long_examples, min_tokens, max_tokens, long_max_tokens,
            list(heldout_lengths), list(heldout_depths), heldout_per_length, seed,
            warmup_examples, list(warmup_tokens), gap_copy_examples, list(gap_copy_tokens),
            rung_examples, list(rung_tokens), vocab_size,
            hashlib.sha256(corpus.read_bytes()).hexdigest() if corpus else None]
    names = ["train_gap_copy", "train_rung", "train_warmup", "train_short", "train_long",
             "heldout_passkey"]
    paths = {k: out / f"{k}.jsonl" for k in names}
    outputs = [*paths.values(), *([out / "tokenizer.json"] if vocab_size else [])]
    manifest = out / ".manifest.json"
    sig = _signature(args)
    if not force and (done := _up_to_date(manifest, sig, outputs)) is not None:
        return {**done, "skipped": True}
    tok, cpt, words = _recipe_tokenizer(out, vocab_size, corpus, max_tokens=max_tokens,
                                        seed=seed)
    if (gap_copy_examples or rung_examples) and not words:
        raise ConfigError(f"the {vocab_size}-token BPE has no one-token words to make gap "
                          "copies of", "train a larger one, e.g. --retrieval_vocab 2048")
    long_span = (max_tokens + 1, long_max_tokens)
    records = {
        "train_gap_copy": _examples(gap_copy_examples, gap_copy_tokens, seed + 6, "gap copies",
                                    shares={"gap_copy": 1.0}, words=words, chars_per_token=cpt),
        "train_rung": _examples(rung_examples, rung_tokens, seed + 7, "rung examples",
                                shares=RUNG_SHARES, words=words, chars_per_token=cpt),
        "train_warmup": _examples(warmup_examples, warmup_tokens, seed + 4, "warm-up examples",
                                  chars_per_token=cpt),
        "train_short": _examples(examples, (min_tokens, max_tokens), seed, "retrieval examples",
                                 shares=REACH_SHARES, chars_per_token=cpt),
        "train_long": _examples(long_examples, long_span, seed + 1, "long retrieval examples",
                                shares=REACH_SHARES, chars_per_token=cpt),
        # Its own seed stream; draw_key keeps its keys out of the training share anyway.
        "heldout_passkey": heldout_passkey(heldout_lengths, heldout_depths,
                                           heldout_per_length, seed=seed + 2, tokenizer=tok)}
    summary = {"out": str(out), "tokenizer": tok.name,
               "chars_per_token": {t: round(c, 3) for t, c in cpt.items()}} | \
        {k: _write_jsonl(paths[k], r) for k, r in records.items()}
    _write_manifest(manifest, sig, summary, outputs)
    return {**summary, "skipped": False}


def _cut(text: str, tokens: int, tok: Tokenizer) -> str | None:
    """The longest prefix of `text` of at most `tokens` tokens, or None if that is more than
    2 tokens short (a text too short, or one whose count jumps there)."""
    ids = tok.encode(text)
    if len(ids) < tokens:
        return None
    # Decoding a prefix and encoding it again can merge (or split a character) across the
    # cut, and a run of spaces can drop two tokens with one character: so cut a little past
    # the mark and drop characters from the end until the count fits.
    head = tok.decode(ids[:tokens + 4])
    while head and len(tok.encode(head)) > tokens:
        head = head[:-1]
    return head if len(tok.encode(head)) >= tokens - 2 else None


def write_long_documents(src: str | Path, dst: str | Path, tokens: int, limit: int = 8,
                         tokenizer: Tokenizer | None = None) -> int:
    """Up to `limit` documents of the jsonl `src` with at least `tokens` tokens of `tokenizer`
    (bytes by default), each cut to its first `tokens` tokens (one or two fewer where no
    character boundary falls exactly there), into `dst`: one evaluation window of held-out
    text per document at context `tokens` (the EOS is the last target), so the loss by
    position reaches the last bucket on every document, at a known cost."""
    import json

    from ringformer.data.corpus import _write_jsonl

    tok = tokenizer or ByteTokenizer()
    docs = []
    with open(src, encoding="utf-8") as f:
        for d in map(json.loads, f):
            if len(docs) == limit:
                break
            if len(d["text"].encode()) >= tokens and (head := _cut(d["text"], tokens, tok)):
                docs.append({"text": head, "path": d.get("path")})
    return _write_jsonl(Path(dst), docs)
