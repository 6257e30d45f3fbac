"""The tokenized cache: sources tokenized once into memory-mapped token shards + an index.

One entry per source (a set of files) under the cache root, `tokens-<what>-<state>/`:

- `tokens-00000.bin`, ...: token ids back to back (uint16 when the vocabulary fits, else
  uint32), BOS included, EOS not stored (the packer adds it);
- `doc_shard.npy`, `doc_start.npy`, `doc_len.npy`, `doc_file.npy` (and `doc_prompt.npy` for
  supervised examples): the document index, in file order;
- `manifest.json`: the commit marker, written last, with every file's size and CRC-32.

`<what>` hashes the resolved paths, the text field and the tokenizer; `<state>` hashes the
files' sizes and modification times. A changed file gives a new state: the entry is rebuilt
and the stale one removed. An entry is built in a private directory and renamed into place,
so a crash never leaves a half entry under the final name; an entry whose files do not match
its manifest (a truncated shard, a missing index) is reported as a `DataWarning` and rebuilt,
never used. `verify_entry` also checks the shards' CRC-32s (a full read; not done per run).

Building reads the sources as bounded work units (`ringformer.data.sources`) and tokenizes
them in a process pool over the machine's cores (inline for small sources), with at most a
few units in flight, so memory stays flat whatever the corpus size. Processes building the
same entry serialise on a lock file; the others then map what the first one wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ringformer.data import sources as src
from ringformer.data.cache_build import CACHE_VERSION, build_entry, crc32_of
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import DataError

_UNMAP_ALIGN = 2 << 20  # the largest folio the kernel maps on a fault (a huge page)
_INDEX = ("doc_shard", "doc_start", "doc_len", "doc_file", "doc_prompt")
_CACHE_FIX = "point data.cache_dir at a writable directory, or leave it empty"


class Shard:
    """A read-only memory map of one token file. Reads copy out, then unmap the pages around
    what they read (they stay in the page cache): the kernel maps large folios (megabytes)
    on a fault, and without this a long run's RSS would grow with the corpus it has read
    rather than with the rows it holds."""

    def __init__(self, path: Path, dtype: np.dtype, n_bytes: int):
        self.dtype, self.n_bytes = dtype, n_bytes
        if n_bytes == 0:  # mmap refuses empty files
            self._mm, self.values = None, np.zeros(0, dtype)
            return
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mm.madvise(mmap.MADV_RANDOM)  # rows read scattered documents: no read-ahead
        self.values = np.frombuffer(self._mm, dtype=dtype)

    def __getitem__(self, s: slice) -> np.ndarray:
        out = np.array(self.values[s])
        if self._mm is not None and out.size:
            lo, _, _ = s.indices(len(self.values))
            a = (lo * self.dtype.itemsize) // _UNMAP_ALIGN * _UNMAP_ALIGN
            b = min(self.n_bytes, a + out.nbytes + 2 * _UNMAP_ALIGN)
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        return out

    def __len__(self) -> int:
        return len(self.values)


def _narrowest(kind: str, hi: int) -> np.dtype:
    for t in ((np.uint8, np.uint16, np.uint32) if kind == "u" else (np.int32,)):
        if hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def load_index_array(path: Path, block: int = 1 << 17) -> np.ndarray:
    """An index .npy in the narrowest dtype that holds its values, read in blocks: the index
    is the one per-document structure a run keeps, so it is held at 1-4 bytes a field
    (about 9 a document) rather than the 24 it is stored with, and never at full width."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) \
            else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        n, data = int(np.prod(shape)), f.tell()
        hi, lo = 0, 0
        for a in range(0, n, block):  # first pass: the range of the values
            part = np.fromfile(f, dtype, min(block, n - a))
            hi, lo = max(hi, int(part.max())), min(lo, int(part.min()))
        out = np.empty(n, _narrowest("u" if lo >= 0 else "i", hi))
        f.seek(data)
        for a in range(0, n, block):
            out[a:a + block] = np.fromfile(f, dtype, min(block, n - a))
    return out


class Entry:
    """A committed cache entry: shards mapped, index in memory (about 9 bytes a document:
    see `load_index_array`)."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = [Shard(path / s["name"], dtype, s["bytes"]) for s in self.manifest["shards"]]
        idx = {k: load_index_array(path / f"{k}.npy") for k in _INDEX
               if (path / f"{k}.npy").is_file()}
        self.shard, self.start = idx["doc_shard"], idx["doc_start"]
        self.length, self.file = idx["doc_len"], idx["doc_file"]
        self.prompt = idx.get("doc_prompt")

    def __len__(self) -> int:
        return len(self.start)

    def tokens(self, d: int) -> np.ndarray:
        s = int(self.start[d])
        return self.shards[int(self.shard[d])][s:s + int(self.length[d])]


# --------------------------------------------------------------------------- where, which

def cache_root(paths: Sequence[Path], cache_dir: str) -> Path:
    """`cache_dir`, checked, or `.cache/` beside the first data path (or, when that is not
    writable, ~/.cache/ringformer). A set `cache_dir` that cannot be used is a DataError."""
    if cache_dir:
        root = Path(cache_dir).expanduser()
        if root.exists() and not root.is_dir():
            raise DataError(f"data.cache_dir {root} is a file, not a directory", _CACHE_FIX)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create data.cache_dir {root}: {e.strerror}",
                            _CACHE_FIX) from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise DataError(f"data.cache_dir {root} is not writable", _CACHE_FIX)
        return root
    root = (paths[0] if paths[0].is_dir() else paths[0].parent) / ".cache"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    # Read-only data (a shared mount): cache per user instead of failing.
    fallback = Path.home() / ".cache" / "ringformer"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _file_stats(paths: Sequence[Path]) -> list:
    stats = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stats.append([str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                           for f in files])
    return stats


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:12]


def entry_name(paths: Sequence[Path], text_field: str, tok: Tokenizer) -> tuple[str, str]:
    """(`tokens-<what>`, `<state>`): see the module doc."""
    what = [CACHE_VERSION, [str(p.resolve()) for p in paths], text_field, tok.name,
            tok.fingerprint, tok.bos_id]
    return f"tokens-{_hash(what)}", _hash(_file_stats(paths))


# --------------------------------------------------------------------------- checking

def entry_problem(path: Path, *, full: bool = False) -> str | None:
    """Why the entry at `path` cannot be used (None: it can). Sizes and the index's CRC are
    always checked; the shards' CRCs only with `full` (a read of the whole entry)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no commit marker (manifest.json): an interrupted build"
    try:
        if manifest.get("version") != CACHE_VERSION:
            return f"written by cache version {manifest.get('version')}"
        # Every field `Entry` reads is checked here: one missing (a hand-edited manifest)
        # was a KeyError when the entry was opened, after this check had passed it.
        if np.dtype(manifest["dtype"]).kind != "u":
            return f"its manifest.json names token dtype {manifest['dtype']!r}"
        if any(f"{k}.npy" not in manifest["index"] for k in _INDEX[:4]):
            return "its manifest.json lacks part of the document index"
        files = [(s["name"], s) for s in manifest["shards"]] + list(manifest["index"].items())
        for name, meta in files:
            if not isinstance(name, str) or Path(name).name != name:  # never outside the entry
                return "its manifest.json is malformed"
            f = path / name
            if not f.is_file() or f.stat().st_size != meta["bytes"]:
                size = f.stat().st_size if f.is_file() else "missing"
                return f"{name} has {size} bytes, the manifest says {meta['bytes']}"
            # Small reads: a run's peak memory should not follow the size of the index.
            if (full or name.endswith(".npy")) and crc32_of(f, 1 << 20) != meta["crc32"]:
                return f"{name} does not match its CRC-32"
    except (AttributeError, KeyError, TypeError, ValueError, OSError):
        # Valid JSON of another shape (a damaged or hand-edited manifest): not ours to use.
        return "its manifest.json is malformed"
    return None


def verify_entry(path: str | Path) -> str | None:
    """`entry_problem` with every shard's CRC-32 checked."""
    return entry_problem(Path(path), full=True)


# --------------------------------------------------------------------------- opening

def open_source(files, tokenizer: Tokenizer, *, text_field: str = "text",
                cache_dir: str = "", workers: int | None = None) -> Entry:
    """The cache entry of `files`, built first if missing, stale or damaged."""
    paths = src.resolve_files(files)
    root = cache_root(paths, cache_dir)
    what, state = entry_name(paths, text_field, tokenizer)
    entry = root / f"{what}-{state}"
    with _locked(root / f".{what}.lock"):
        if entry.exists() and not entry.is_dir():
            # Not something a build makes, so not ours to delete (and a rename onto it fails).
            raise DataError(f"tokenized cache entry {entry} is a file, not a directory",
                            "move it aside, or point data.cache_dir at another directory")
        if entry.exists():
            problem = entry_problem(entry)
            if problem is None:
                try:
                    return Entry(entry)
                except (KeyError, TypeError, ValueError, OSError) as e:
                    problem = f"it cannot be opened: {e!r}"  # damage entry_problem missed
            warnings.warn(f"tokenized cache {entry} is damaged ({problem}): rebuilding",
                          src.DataWarning, stacklevel=2)
        tmp = root / f"{what}-{state}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_entry(paths, tokenizer, text_field, tmp, workers=workers)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # bad data leaves nothing behind
            raise
        for old in root.glob(f"{what}-*"):  # stale states and leftovers of crashed builds
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, entry)
        return Entry(entry)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the entry's build lock: builders of one entry serialise on this file."""
    try:
        lock = open(path, "a")  # noqa: SIM115 (closed below; the lock goes with it)
    except OSError as e:  # a directory or an unwritable file at its path: not ours to remove
        raise DataError(f"cannot open the tokenized cache's lock file {path}: {e.strerror}",
                        "move it aside, or point data.cache_dir at another directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def iter_documents(entry: Entry, eos_id: int) -> Iterator[np.ndarray]:
    """Each document as int32 `[BOS] + ids + [EOS]`, in file order."""
    eos = np.array([eos_id], np.int32)
    for d in range(len(entry)):
        yield np.concatenate([entry.tokens(d).astype(np.int32), eos])

