"""Local data files -> one Hugging Face `datasets.Dataset` with a single `text` column.

Accepted: `.jsonl` / `.json` (one object per line, or a JSON array; the text field is
configurable), `.txt` (the whole file is one document), `.parquet`, and directories written by
`Dataset.save_to_disk`. A plain directory stands for the accepted files below it. Entries may
be globs and may be given as a list or as one comma-separated string.

Every check that can fail runs here, before training starts, and fails as a `DataError`
naming the file (and line) and the fix: missing paths, globs matching nothing, empty files,
invalid JSON, a missing or non-string text field. Undecodable bytes are not fatal: they
become U+FFFD and the count is reported as a `DataWarning`.

The files are parsed with our own reader rather than `load_dataset("json")` because its errors
name neither the file nor the line, and it writes to the global HF cache.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # set before datasets is imported: never reach the hub
os.environ["HF_HUB_OFFLINE"] = "1"

import datasets
from tqdm.auto import tqdm

from ringformer.errors import DataError

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
_FIX_PATHS = ("check data.train_files / data.eval_files (run scripts/prepare_data.py for the "
              "default corpus)")


class DataWarning(UserWarning):
    """Data that was read, but not exactly as written (e.g. undecodable bytes replaced)."""


def _split_entries(files: str | Path | Sequence[str | Path]) -> list[str]:
    items = [files] if isinstance(files, str | Path) else list(files)
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _expand_dir(path: Path) -> list[Path]:
    if is_saved_dataset(path):
        return [path]
    found: list[Path] = []
    for root, dirs, names in os.walk(path):
        # Hidden directories hold caches (ours included), never source data.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_saved_dataset(Path(root, d)):
                found.append(Path(root, d))
                dirs.remove(d)
        found.extend(Path(root, n) for n in sorted(names)
                     if n.endswith(SUFFIXES) and not n.startswith("."))
    if not found:
        raise DataError(f"directory {path} holds no data files",
                        f"put {', '.join(SUFFIXES)} files or a save_to_disk dataset in it")
    return found


def resolve_files(files: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand globs, comma lists and directories into existing, supported paths (in order)."""
    entries = _split_entries(files)
    if not entries:
        raise DataError("no data files given", _FIX_PATHS)
    paths: list[Path] = []
    for entry in entries:
        entry = os.path.expanduser(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"no files match {entry!r}", _FIX_PATHS)
        elif not os.path.exists(entry):
            raise DataError(f"data file {entry} does not exist", _FIX_PATHS)
        else:
            matches = [entry]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths.extend(_expand_dir(p))
            elif p.suffix in SUFFIXES:
                paths.append(p)
            else:
                raise DataError(f"data file {p} has an unsupported type {p.suffix or '(none)'!r}",
                                f"use {', '.join(SUFFIXES)} files or a save_to_disk directory")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _decode(path: Path, raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of undecodable sequences replaced by U+FFFD."""
    try:
        text = raw.decode("utf-8")
        replaced = 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD written in the file on purpose is not damage; count only what we replaced.
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    return text.removeprefix("\ufeff"), replaced


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {path} is empty", "remove it from the data files or fill it")
    return raw


def _text_of(obj, path: Path, where: str, field: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{path}{where}: expected a JSON object, got {type(obj).__name__}",
                        'write one object per line, e.g. {"text": "..."}')
    if field not in obj:
        have = ", ".join(sorted(obj)) or "none"
        raise DataError(f"{path}{where}: no field {field!r} (fields: {have})",
                        "set data.text_field to the field that holds the text")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{path}{where}: field {field!r} is {type(value).__name__}, not a string",
                        "store the document text as a JSON string")
    return value


def _clean(text: str) -> tuple[str, int]:
    """Lone surrogates (from JSON \\ud800 escapes) cannot be stored as UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", errors="replace").decode("utf-8")
        return fixed, fixed.count("?") - text.count("?")


def _read_json(path: Path, field: str) -> tuple[list[str], int]:
    text, replaced = _decode(path, _read_bytes(path))
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})",
                            "fix the file so it parses as a JSON array") from None
        docs = [_text_of(r, path, f"[{i}]", field) for i, r in enumerate(records)]
    else:
        docs = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})",
                                "fix or delete that line; each line must be one JSON object"
                                ) from None
            value = _text_of(obj, path, f":{lineno}", field)
            if "\\u" in line:  # only escapes can smuggle in lone surrogates
                value, n = _clean(value)
                replaced += n
            docs.append(value)
    if not docs:
        raise DataError(f"data file {path} has no records", "remove it or add documents")
    return docs, replaced


def _read_parquet(path: Path, field: str) -> datasets.Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _read_bytes(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}",
                        "rewrite it with pyarrow or pandas .to_parquet()") from None
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})",
                        "set data.text_field to the column that holds the text")
    table = pq.read_table(path, columns=[field])
    return _text_table(table, field, path)


def _text_table(table, field: str, path: Path) -> datasets.Dataset:
    import pyarrow as pa

    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: column {field!r} has type {col.type}, not string",
                        "set data.text_field to a text column")
    if col.null_count:
        raise DataError(f"{path}: column {field!r} has {col.null_count} missing values",
                        "drop or fill the rows without text")
    if len(col) == 0:
        raise DataError(f"data set {path} has no rows", "remove it or add documents")
    return datasets.Dataset(pa.table({"text": col.cast(pa.string())}))


def _read_saved(path: Path, field: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for damaged directories
        raise DataError(f"cannot load saved dataset {path}: {e}",
                        "point at a directory written by Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{path} holds several splits ({', '.join(ds)})",
                            f"name one split directory, e.g. {path / next(iter(ds))}")
        ds = next(iter(ds.values()))
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(ds.column_names)})",
                        "set data.text_field to the column that holds the text")
    return _text_table(ds.with_format(None).data.table.select([field]), field, path)


def _read_one(path: Path, field: str) -> tuple[datasets.Dataset, int, int]:
    """(dataset, replaced sequences, empty documents skipped) for one path."""
    if path.is_dir():
        return _read_saved(path, field), 0, 0
    if path.suffix == ".parquet":
        return _read_parquet(path, field), 0, 0
    if path.suffix == ".txt":
        text, replaced = _decode(path, _read_bytes(path))
        docs = [text]
    else:
        docs, replaced = _read_json(path, field)
    kept = [d for d in docs if d]
    if not kept:
        raise DataError(f"data file {path} has only empty documents",
                        "remove it or add text")
    return datasets.Dataset.from_dict({"text": kept}, features=TEXT_FEATURES), replaced, \
        len(docs) - len(kept)


def load_paths(paths: Iterable[Path], *, text_field: str = "text") -> datasets.Dataset:
    """Read already-resolved paths; see `load_documents`."""
    paths = list(paths)
    parts: list[datasets.Dataset] = []
    empty = 0
    for path in tqdm(paths, desc="reading data", unit="file", disable=len(paths) < 20,
                     leave=False):
        ds, replaced, skipped = _read_one(path, text_field)
        if replaced:
            warnings.warn(f"{path}: {replaced} undecodable byte sequence(s) replaced with U+FFFD",
                          DataWarning, stacklevel=3)
        empty += skipped
        parts.append(ds)
    if empty:
        warnings.warn(f"skipped {empty} empty document(s)", DataWarning, stacklevel=3)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_documents(files: str | Path | Sequence[str | Path], *,
                   text_field: str = "text") -> datasets.Dataset:
    """All documents of `files` as a Dataset with one string column, `text`, in file order."""
    return load_paths(resolve_files(files), text_field=text_field)
