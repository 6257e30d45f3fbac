"""The data preparation tool behind scripts/prepare_data.py: its options, checked before any
file is read or written, and the build of the default corpus, the passkey documents and the
long-context recipe's retrieval data (ringformer/data/retrieval.py, under OUT/longctx).
"""

from __future__ import annotations

import argparse
from argparse import ArgumentTypeError
from pathlib import Path

from ringformer.errors import ConfigError, DataError

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data"


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"bad list {text!r}", "write comma-separated numbers, e.g. 1024,4096"
                        ) from None


def _at_least(low: int):
    """argparse type: an int >= low (corpus.stdlib_files reads --limit 0 as no limit at all)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise ArgumentTypeError(f"must be at least {low}, not {value}")
        return value
    return parse


def _retrieval_flags(parser: argparse.ArgumentParser) -> None:
    """The long-context recipe's synthetic data (ringformer/data/retrieval.py), under OUT/longctx."""
    parser.add_argument("--retrieval_examples", type=_at_least(0), default=0,
                        help="supervised passkey and key-value examples of up to "
                             "--retrieval_max_tokens (default 0: no retrieval data)")
    parser.add_argument("--retrieval_long_examples", type=_at_least(0), default=0,
                        help="more examples of --retrieval_max_tokens to "
                             "--retrieval_long_max_tokens tokens (stage 2)")
    parser.add_argument("--retrieval_warmup_examples", type=_at_least(0), default=0,
                        help="short examples for the warm-up phase, of "
                             "--retrieval_warmup_min_tokens to --retrieval_warmup_max_tokens")
    parser.add_argument("--retrieval_gap_copy_examples", type=_at_least(0), default=0,
                        help="gap copies of 32-256 tokens for the smeared-key warm-up "
                             "(lists of one-token words and a number; needs the BPE)")
    parser.add_argument("--retrieval_rung_examples", type=_at_least(0), default=0,
                        help="gap copies, passkeys and key-value lookups of 32-512 tokens "
                             "for the rung between the warm-up and stage 1")
    parser.add_argument("--retrieval_warmup_min_tokens", type=_at_least(16), default=16)
    parser.add_argument("--retrieval_warmup_max_tokens", type=_at_least(16), default=128)
    parser.add_argument("--retrieval_vocab", type=_at_least(0), default=2048,
                        help="train a byte-level BPE of this many tokens for the retrieval data "
                             "(data/longctx/tokenizer.json; lengths count its tokens); 0: bytes")
    parser.add_argument("--retrieval_min_tokens", type=_at_least(256), default=256)
    parser.add_argument("--retrieval_max_tokens", type=_at_least(256), default=4096)
    parser.add_argument("--retrieval_long_max_tokens", type=_at_least(256), default=16384)
    parser.add_argument("--heldout_lengths", default="1024,2048,4096,8192,16384",
                        help="held-out passkey prompt lengths (tokens, answer included)")
    parser.add_argument("--heldout_depths", default="0,0.25,0.5,0.75,1",
                        help="held-out key depths in [0, 1], taken in turn")
    parser.add_argument("--heldout_per_length", type=_at_least(1), default=20,
                        help="held-out passkey prompts per length")
    parser.add_argument("--heldout_doc_tokens", type=_at_least(256), default=16384,
                        help="held-out eval documents are cut to this many tokens")


def _check_retrieval(args: argparse.Namespace) -> None:
    from ringformer.data.passkey import bare_prompt_tokens

    args.heldout = (_numbers(args.heldout_lengths, int), _numbers(args.heldout_depths, float))
    if not args.retrieval_examples:
        return
    if not args.retrieval_min_tokens <= args.retrieval_max_tokens < args.retrieval_long_max_tokens:
        raise ConfigError("retrieval lengths must satisfy --retrieval_min_tokens <= "
                          "--retrieval_max_tokens < --retrieval_long_max_tokens",
                          "e.g. --retrieval_min_tokens 256 --retrieval_max_tokens 4096")
    if not args.retrieval_warmup_min_tokens <= args.retrieval_warmup_max_tokens:
        raise ConfigError("--retrieval_warmup_min_tokens is above --retrieval_warmup_max_tokens",
                          "e.g. --retrieval_warmup_min_tokens 16 --retrieval_warmup_max_tokens 128")
    if (args.retrieval_gap_copy_examples or args.retrieval_rung_examples) \
            and not args.retrieval_vocab:
        raise ConfigError("gap copies are lists of one-token words of the recipe's BPE, and "
                          "--retrieval_vocab 0 trains none",
                          "use --retrieval_vocab 2048, or no gap-copy and rung examples")
    if 0 < args.retrieval_vocab < 260:
        raise ConfigError(f"--retrieval_vocab {args.retrieval_vocab} leaves no room for merges",
                          "use 0 (bytes) or 260 or more, e.g. 2048")
    lengths, depths = args.heldout
    # Counted in bytes: never fewer tokens than the BPE's, so this holds for both.
    least = bare_prompt_tokens() + 8  # the prompt and its answer, " KEY" plus slack
    if not lengths or not depths or min(lengths) < least or not all(0 <= d <= 1 for d in depths):
        raise ConfigError(f"--heldout_lengths need values of {least} or more and "
                          "--heldout_depths values in [0, 1]",
                          "e.g. --heldout_lengths 1024,4096 --heldout_depths 0,0.5,1")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The tool's flags, spelled with underscores (the dashed spellings of earlier versions
    still work)."""
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--limit", type=_at_least(1), default=None,
                        help="use only the first N files (default: all)")
    parser.add_argument("--eval_fraction", "--eval-fraction", type=float, default=0.05,
                        help="share of the files held out for evaluation (default 0.05)")
    parser.add_argument("--passkey_lengths", "--passkey-lengths", default="1024,4096,16384",
                        help="passkey prompt lengths in tokens, comma-separated")
    parser.add_argument("--passkey_depths", "--passkey-depths", default="0,0.25,0.5,0.75,1",
                        help="key depths in [0, 1], comma-separated")
    parser.add_argument("--seed", type=_at_least(0), default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    _retrieval_flags(parser)


def check_options(args: argparse.Namespace) -> None:
    """Raise ConfigError/DataError for the first bad option; adds `lengths`, `depths` and
    `heldout` (the held-out passkey lengths and depths) to `args`."""
    from ringformer.data.passkey import MAX_LENGTH, bare_prompt_tokens

    _check_retrieval(args)
    args.lengths = _numbers(args.passkey_lengths, int)
    args.depths = _numbers(args.passkey_depths, float)
    if not args.lengths or not args.depths:
        # An empty passkey.jsonl would be written, and then refused by the trainer as empty.
        raise ConfigError("--passkey_lengths and --passkey_depths need at least one value each",
                          "e.g. --passkey_lengths 1024,4096 --passkey_depths 0,0.5,1")
    if not all(0 <= d <= 1 for d in args.depths) or not 0 < args.eval_fraction < 1:
        raise DataError("passkey depths must lie in [0, 1] and --eval_fraction in (0, 1)",
                        "e.g. --passkey_depths 0,0.5,1 --eval_fraction 0.05")
    # Checked here, not when the passkey file is built: that comes after the whole corpus.
    least = bare_prompt_tokens()
    for n in args.lengths:
        if n < least:
            raise ConfigError(f"--passkey_lengths {n} is shorter than the bare prompt ({least} "
                              "tokens)", f"use passkey lengths of {least} tokens or more")
        if n > MAX_LENGTH:
            raise ConfigError(f"--passkey_lengths {n} is longer than the {MAX_LENGTH} tokens a "
                              "passkey prompt may have", f"use lengths of at most {MAX_LENGTH}")


def build(args: argparse.Namespace) -> list[str]:
    """Build (or find up to date) everything the checked options ask for; one report line
    per part."""
    from ringformer.data.corpus import build_passkey_file, build_stdlib_corpus

    out = Path(args.out)
    try:
        stdlib = build_stdlib_corpus(out / "stdlib", limit=args.limit,
                                     eval_fraction=args.eval_fraction, force=args.force)
        passkey = build_passkey_file(out / "passkey" / "passkey.jsonl",
                                     lengths=args.lengths, depths=args.depths,
                                     seed=args.seed, force=args.force)
        retrieval = _build_retrieval(args, out) if args.retrieval_examples else None
    except OSError as e:
        raise DataError(f"cannot write under {out}: {e}", "choose a writable --out") from None
    except ConfigError:
        raise  # already says what to change
    except ValueError as e:
        raise DataError(str(e), "use passkey lengths of a few hundred tokens or more"
                        ) from None
    state = "up to date" if stdlib["skipped"] else "written"
    lines = [f"stdlib corpus {state}: {out / 'stdlib'} train={stdlib['train']['documents']} "
             f"docs ({stdlib['train']['bytes']} bytes), eval={stdlib['eval']['documents']} docs",
             f"passkey documents {'up to date' if passkey['skipped'] else 'written'}: "
             f"{passkey['out']} ({passkey['documents']} docs)"]
    if retrieval:
        cpt = ", ".join(f"{t} {c}" for t, c in retrieval["chars_per_token"].items())
        counts = ", ".join(f"{k} {retrieval[k]}" for k in (
            "train_gap_copy", "train_rung", "train_warmup", "train_short", "train_long",
            "heldout_passkey", "heldout_long"))
        lines.append(f"retrieval data {'up to date' if retrieval['skipped'] else 'written'}: "
                     f"{retrieval['out']} (tokenizer {retrieval['tokenizer']}"
                     f"{f'; chars/token: {cpt}' if cpt else ''}; docs: {counts})")
    return lines


def _build_retrieval(args: argparse.Namespace, out: Path) -> dict:
    from ringformer.data.retrieval import build_retrieval_files, write_long_documents
    from ringformer.data.tokenizer import load_tokenizer

    lengths, depths = args.heldout
    done = build_retrieval_files(
        out / "longctx", examples=args.retrieval_examples,
        long_examples=args.retrieval_long_examples, min_tokens=args.retrieval_min_tokens,
        max_tokens=args.retrieval_max_tokens, long_max_tokens=args.retrieval_long_max_tokens,
        heldout_lengths=lengths, heldout_depths=depths,
        heldout_per_length=args.heldout_per_length, seed=args.seed,
        warmup_examples=args.retrieval_warmup_examples,
        warmup_tokens=(args.retrieval_warmup_min_tokens, args.retrieval_warmup_max_tokens),
        gap_copy_examples=args.retrieval_gap_copy_examples,
        rung_examples=args.retrieval_rung_examples,
        vocab_size=args.retrieval_vocab, corpus=out / "stdlib" / "train.jsonl",
        force=args.force)
    # By their place, not the paths the manifest recorded: the data directory may have moved.
    done["out"] = str(out / "longctx")
    if args.retrieval_vocab:
        done["tokenizer"] = str(out / "longctx" / "tokenizer.json")
    tok = load_tokenizer(done["tokenizer"])
    # Cheap, so rewritten every time: it follows the stdlib split it is cut from.
    done["heldout_long"] = write_long_documents(out / "stdlib" / "eval.jsonl",
                                                out / "longctx" / "heldout_long.jsonl",
                                                args.heldout_doc_tokens, tokenizer=tok)
    return done
