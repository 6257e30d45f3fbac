"""The default corpus: the Python standard library's sources, plus passkey documents.

Every machine with Python has them, they are real code and prose, and many files are longer
than 20K bytes, which is what long-context training needs. The split is a stable hash of the
path relative to the stdlib root, so a file lands in the same split on every machine and
Python version. Outputs are rewritten only when their inputs change (a manifest records a
signature of the inputs), and written under a temporary name then renamed, so an interrupted
run never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ringformer.data.passkey import make_passkey_example

FORMAT_VERSION = 1
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, limit: int | None = None,
                 eval_fraction: float = 0.05) -> list[Path]:
    """Non-empty *.py files under `root`, test suites and installed packages left out.

    `limit` keeps the first files of each split in proportion (at least one eval file), so
    a small corpus for tests still has both splits and every file keeps its split.
    """
    root = root or stdlib_root()
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(dirpath, n) for n in sorted(names) if n.endswith(".py"))
    found = [p for p in found if p.stat().st_size > 0]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not limit:
        return found
    is_eval = [split_of(p.relative_to(root).as_posix(), eval_fraction) == "eval" for p in found]
    evals = [p for p, e in zip(found, is_eval, strict=True) if e]
    trains = [p for p, e in zip(found, is_eval, strict=True) if not e]
    n_eval = min(len(evals), max(1, round(limit * eval_fraction)))
    keep = set(evals[:n_eval]) | set(trains[:max(0, limit - n_eval)])
    return [p for p in found if p in keep]


def split_of(relpath: str, eval_fraction: float = 0.05) -> str:
    """'eval' or 'train' from a hash of the path: stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return "eval" if h / 2.0 ** 64 < eval_fraction else "train"


def _signature(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _up_to_date(manifest: Path, signature: str, outputs: Iterable[Path]) -> dict | None:
    """The recorded summary if `manifest` matches `signature` and every output still has the
    size it was written with; None means rebuild. A manifest damaged on disk (any JSON of
    another shape) or an output truncated or replaced since is a rebuild, never a traceback."""
    try:
        m = json.loads(manifest.read_text())
        sizes = m["sizes"]
        ok = (m["signature"] == signature and isinstance(m["summary"], dict)
              and all(p.is_file() and p.stat().st_size == sizes[p.name] for p in outputs))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return m["summary"] if ok else None


def _write_manifest(manifest: Path, signature: str, summary: dict, outputs: Iterable[Path]) -> None:
    record = {"signature": signature, "summary": summary,
              "sizes": {p.name: p.stat().st_size for p in outputs}}
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, manifest)  # never half a manifest that parses


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def build_stdlib_corpus(out_dir: str | Path, *, limit: int | None = None,
                        eval_fraction: float = 0.05, force: bool = False) -> dict:
    """Write `out_dir/train.jsonl` and `out_dir/eval.jsonl` (fields `text`, `path`).

    Returns a summary dict; `skipped` is True when the files were already up to date.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    files = stdlib_files(root, limit, eval_fraction)
    stats = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
             for p in files]
    sig = _signature([FORMAT_VERSION, str(root), sys.version, stats, eval_fraction])
    outputs = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    manifest = out / ".manifest.json"  # hidden: a directory of data files skips it
    if not force and (done := _up_to_date(manifest, sig, outputs.values())) is not None:
        return {**done, "skipped": True}

    records: dict[str, list[dict]] = {"train": [], "eval": []}
    for p, (rel, _, _) in zip(tqdm(files, desc="stdlib sources", unit="file"), stats,
                              strict=True):
        # A few stdlib files are deliberately not UTF-8; keep them, with U+FFFD where needed.
        text = p.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            records[split_of(rel, eval_fraction)].append({"text": text, "path": rel})
    summary: dict = {"root": str(root), "out": str(out)}
    for split, path in outputs.items():
        docs = records[split]
        summary[split] = {"documents": _write_jsonl(path, docs),
                          "bytes": sum(len(d["text"].encode()) for d in docs),
                          "over_20k_bytes": sum(len(d["text"].encode()) > 20_000 for d in docs)}
    _write_manifest(manifest, sig, summary, outputs.values())
    return {**summary, "skipped": False}


def build_passkey_file(path: str | Path, *, lengths: Sequence[int] = (1024, 4096, 16384),
                       depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0,
                       force: bool = False) -> dict:
    """One passkey document per (length, depth), byte-tokenizer lengths.

    Fields: `text` (prompt + answer, so the file also works as ordinary data), `prompt`,
    `key`, `answer`, `length`, `depth`, `needle_char`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sig = _signature([FORMAT_VERSION, list(lengths), list(depths), seed])
    manifest = path.with_name(f".{path.stem}.manifest.json")
    if not force and (done := _up_to_date(manifest, sig, [path])) is not None:
        return {**done, "skipped": True}
    rng = np.random.default_rng(seed)
    records = []
    for n in lengths:
        for d in depths:
            ex = make_passkey_example(int(n), float(d), rng=rng)
            records.append({"text": ex.text + ex.answer, "prompt": ex.text, "key": ex.key,
                            "answer": ex.answer, "length": int(n), "depth": float(d),
                            "needle_char": ex.needle_char})
    summary = {"out": str(path), "documents": _write_jsonl(path, records)}
    _write_manifest(manifest, sig, summary, [path])
    return {**summary, "skipped": False}
