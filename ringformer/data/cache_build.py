"""Building one cache entry (see `ringformer.data.cache`): read, tokenize, write, commit.

The main process reads work units and writes shards in order; a pool of worker processes
parses and tokenizes them. At most `2 x workers` units are in flight, so memory does not
depend on the corpus size. Workers are spawned, not forked: the caller may run jax threads.
A worker that dies (killed, out of memory) fails the build with a DataError at once; the
caller removes the unfinished entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import pickle
import sys
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ringformer.data import sources as src
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import DataError

CACHE_VERSION = 2
SHARD_TOKENS = 1 << 28  # a new shard file after this many tokens (512 MiB of uint16)
POOL_MIN_BYTES = 32 << 20  # smaller sources tokenize inline: a pool costs a second to start
_TOK: Tokenizer | None = None  # the worker process's tokenizer, set once by the pool
_TRIM = None  # glibc's malloc_trim, looked up on first use (False: not available)
TRIM_BYTES = 32 << 20  # text read between two trims (a trim costs about a millisecond)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere). The
    build frees a few MB of text and tokens per unit, and glibc keeps such freed blocks in its
    heap: building a 4 GB corpus, RSS grew from 0.19 to 0.55 GiB with only ~40 MB of it
    live; with a trim every 32 MB of text it stays between 0.11 and 0.21 GiB throughout."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return mp.cpu_count()


def crc32_of(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)


def encode_records(records: list, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens back to back, length of each document, prompt tokens of each: 0 for plain
    documents). A document is `[BOS] + ids`; a supervised example `[BOS] + prompt + response`
    with at least 1 prompt token (position 0 is never a target, so this marks it whole)."""
    pieces: list[str] = []
    for r in records:
        if isinstance(r, str):
            pieces.append(r)
        else:
            pieces.extend(tok.render_chat(r) if isinstance(r, list) else r)
    enc = tok.encode_arrays(pieces)
    bos = [] if tok.bos_id is None else [np.array([tok.bos_id], np.int32)]
    parts, lengths, prompts, i = [], [], [], 0
    for r in records:
        if isinstance(r, str):
            body, prompt = [enc[i]], 0
            i += 1
        else:
            body, prompt = [enc[i], enc[i + 1]], max(1, len(bos) + len(enc[i]))
            i += 2
        parts.extend(bos + body)
        lengths.append(len(bos) + sum(len(b) for b in body))
        prompts.append(prompt)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return (flat.astype(token_dtype(tok)), np.array(lengths, np.int64),
            np.array(prompts, np.int32))


def tokenize_unit(unit: src.Unit, tok: Tokenizer) -> tuple:
    """("ok", tokens, lengths, prompts, parsed) or ("error", what, fix, setting): a DataError
    crosses the process boundary as plain values."""
    try:
        parsed = src.parse_unit(unit)
    except DataError as e:
        return ("error", e.what, e.fix, e.setting)
    tokens, lengths, prompts = encode_records(parsed.records, tok)
    parsed.records = [None] * len(parsed.records)  # counted, not shipped back
    return ("ok", tokens, lengths, prompts, parsed)


def _init_worker(tok: Tokenizer) -> None:
    global _TOK
    _TOK = tok


def _work(unit: src.Unit) -> tuple:
    return tokenize_unit(unit, _TOK)


def _size(unit: src.Unit) -> int:
    return len(unit.raw) if unit.texts is None else sum(len(t) for t in unit.texts
                                                        if isinstance(t, str))


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Workers need only ringformer; a spawned worker would otherwise re-run the caller's
    script as `__mp_main__`, and a script without a `__main__` guard would then build this
    very cache again (waiting forever on our lock)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__} \
        if main is not None else {}
    try:
        for k in saved:
            main.__dict__[k] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _results(units: Iterator[tuple[int, src.Unit]], tok: Tokenizer,
             workers: int) -> Iterator[tuple[int, int, tuple]]:
    """(file id, unit bytes, tokenize_unit result) in input order."""
    if workers <= 1:
        for fid, u in units:
            yield fid, _size(u), tokenize_unit(u, tok)
        return
    # Not multiprocessing.Pool: it replaces a worker that dies (killed, OOM) and leaves the
    # dead one's task pending forever; the executor fails every pending future instead.
    # Workers start on demand, so __main__ stays hidden while the pool lives.
    with _main_hidden(), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker,
                                             initargs=(tok,)) as pool:
        pending: deque = deque()
        try:
            for fid, u in units:
                pending.append((fid, _size(u), pool.submit(_work, u)))
                if len(pending) >= 2 * workers:
                    yield _collect(pending.popleft())
            while pending:
                yield _collect(pending.popleft())
        finally:  # bad data or a dead worker: drop the queued units, do not tokenize them
            for *_, fut in pending:
                fut.cancel()


def _collect(item: tuple) -> tuple[int, int, tuple]:
    fid, n, fut = item
    try:
        return fid, n, fut.result()
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died while building the tokenized cache "
                        "(killed, out of memory, or crashed in the tokenizer)",
                        "free memory, or give the run fewer cores (e.g. taskset -c 0), and run "
                        "again: the unfinished entry was removed and will be rebuilt") from None


class _Writer:
    """Shards, index and manifest of an entry being built in `out` (a private directory)."""

    def __init__(self, out: Path, dtype: np.dtype):
        out.mkdir(parents=True)
        self.out, self.dtype = out, dtype
        self.shards: list[dict] = []
        self.f, self.n = None, 0
        self.idx: dict[str, list] = {k: [] for k in ("doc_shard", "doc_start", "doc_len",
                                                      "doc_file", "doc_prompt")}

    def _roll(self) -> None:
        self._close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.shards.append({"name": name, "bytes": 0, "crc32": 0})
        # Open across add() calls; closed by _close (an aborted build removes the directory).
        self.f, self.n = open(self.out / name, "wb"), 0  # noqa: SIM115

    def _close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, prompts: np.ndarray, fid: int) -> None:
        if self.f is None or self.n >= SHARD_TOKENS:
            self._roll()
        raw = tokens.tobytes()
        self.f.write(raw)
        meta = self.shards[-1]
        meta["bytes"] += len(raw)
        meta["crc32"] = zlib.crc32(raw, meta["crc32"])
        starts = self.n + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.idx["doc_shard"].append(np.full(len(lengths), len(self.shards) - 1, np.int32))
        self.idx["doc_start"].append(starts)
        self.idx["doc_len"].append(lengths)
        self.idx["doc_file"].append(np.full(len(lengths), fid, np.int32))
        self.idx["doc_prompt"].append(prompts)
        self.n += len(tokens)

    def commit(self, info: dict) -> None:
        """Index files, then the manifest: its presence is what makes the entry valid."""
        if self.f is None:
            self._roll()
        self._close()
        index = {}
        for k, parts in self.idx.items():
            arr = np.concatenate(parts)
            if k == "doc_prompt" and not arr.any():
                continue  # plain documents only
            np.save(self.out / f"{k}.npy", arr)
            f = self.out / f"{k}.npy"
            index[f.name] = {"bytes": f.stat().st_size, "crc32": crc32_of(f)}
        manifest = {"version": CACHE_VERSION, "dtype": self.dtype.name,
                    "shards": self.shards, "index": index, **info}
        tmp = self.out / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.rename(self.out / "manifest.json")


def _units(paths: Sequence[Path], text_field: str) -> Iterator[tuple[int, src.Unit]]:
    for fid, path in enumerate(paths):
        for unit in src.read_units(path, text_field):
            yield fid, unit


def build_entry(paths: Sequence[Path], tok: Tokenizer, text_field: str, out: Path, *,
                workers: int | None = None) -> None:
    """Tokenize `paths` into a committed entry at `out` (which must not exist)."""
    total = sum(f.stat().st_size for p in paths
                for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    workers = workers or default_workers()
    if total < POOL_MIN_BYTES:
        workers = 1
    try:
        pickle.dumps(tok)
    except Exception:  # a tokenizer that cannot travel to a worker tokenizes here
        workers = 1
    writer = _Writer(out, token_dtype(tok))
    tallies = [src.FileTally(str(p)) for p in paths]
    done, n_docs, n_tokens, read = 0, 0, 0, 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
               disable=total < POOL_MIN_BYTES, leave=False)
    # closing: an error stops the pool now, not when the traceback holding it is freed.
    with bar, contextlib.closing(_results(_units(paths, text_field), tok, workers)) as results:
        for fid, size, res in results:
            if res[0] == "error":
                raise DataError(res[1], res[2], setting=res[3])
            _, tokens, lengths, prompts, parsed = res
            while done < fid:  # every unit of the earlier files has been seen
                tallies[done].finish()
                done += 1
            tallies[fid].add(parsed)
            writer.add(tokens, lengths, prompts, fid)
            n_docs, n_tokens = n_docs + len(lengths), n_tokens + len(tokens)
            bar.update(size)
            read += size
            if (read - size) // TRIM_BYTES != read // TRIM_BYTES:
                _release_freed_memory()
    empty = sum(t.finish() for t in tallies[done:]) + sum(t.empty for t in tallies[:done])
    if empty:
        warnings.warn(f"skipped {empty} empty document(s)", src.DataWarning, stacklevel=3)
    writer.commit({"tokenizer": tok.name, "text_field": text_field, "n_docs": n_docs,
                   "n_tokens": n_tokens, "files": [str(p) for p in paths]})
