"""Local data files, read in a streaming fashion: work units of bounded size, then records.

Accepted: `.jsonl` / `.json` (one object per line, or a JSON array), `.txt` (the whole file
is one document), `.parquet`, and directories written by `Dataset.save_to_disk`. A plain
directory stands for the accepted files below it. Entries may be globs and may be given as a
list or as one comma-separated string.

Nothing holds a whole file: JSON lines are read in blocks of whole lines, parquet by row
group, saved datasets (memory-mapped Arrow) by record batch. Two formats are whole by nature:
a `.txt` file is one document, and a `.json` array has to be parsed as one value.

A record is a document's text, or a supervised example: `{"prompt", "response"}` or
`{"messages": [{"role", "content"}, ...]}` (rendered by the tokenizer's chat template).

Every check that can fail raises a `DataError` naming the file (and line) and the fix: missing
paths, globs matching nothing, empty files, invalid JSON, a missing or non-string text field.
Undecodable bytes are not fatal: they become U+FFFD and are counted (`Parsed.replaced`).

The files are parsed with our own reader rather than `load_dataset("json")` because its errors
name neither the file nor the line, and it writes to the global HF cache.
"""

from __future__ import annotations

import glob
import json
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # set before datasets is imported: never reach the hub
os.environ["HF_HUB_OFFLINE"] = "1"

from ringformer.errors import DataError

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
# The settings a DataError's fix is about (DataError.setting), for tools that take them by flag.
FILES_SETTING = "data.train_files / data.eval_files"
TEXT_FIELD_SETTING = "data.text_field"
_FIX_PATHS = f"check {FILES_SETTING} (run scripts/prepare_data.py for the default corpus)"
BLOCK_BYTES = 4 << 20  # one work unit of JSON lines: big enough to amortise a process hop
BATCH_ROWS = 4096  # rows per parquet / Arrow work unit (parquet row groups are cut to this)


class DataWarning(UserWarning):
    """Data that was read, but not exactly as written (e.g. undecodable bytes replaced)."""


@dataclass(frozen=True)
class Unit:
    """A bounded piece of one file: `raw` JSON lines starting at `line`, or `texts`."""

    path: str
    field: str
    raw: bytes = b""
    line: int = 1
    texts: list | None = None
    keep_empty: bool = False  # parquet / Arrow rows are documents even when empty
    replaced: int = 0  # undecodable sequences already replaced in `texts`


@dataclass
class Parsed:
    """Records of a unit: str (a document) | (prompt, response) | list of chat messages."""

    records: list = field(default_factory=list)
    replaced: int = 0  # undecodable sequences replaced by U+FFFD
    empty: int = 0  # empty documents skipped


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
        raise DataError("no data files given", _FIX_PATHS, setting=FILES_SETTING)
    paths: list[Path] = []
    for entry in entries:
        entry = os.path.expanduser(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"no files match {entry!r}", _FIX_PATHS, setting=FILES_SETTING)
        elif not os.path.exists(entry):
            what = ("is a link to nothing (or a symlink loop)" if os.path.lexists(entry)
                    else "does not exist")
            raise DataError(f"data file {entry} {what}", _FIX_PATHS, setting=FILES_SETTING)
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
        _check_readable(p)
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_readable(p: Path) -> None:
    """A data path is a directory or a regular file: a FIFO or device may never yield (the
    reader would wait forever) or never end."""
    try:
        mode = os.stat(p).st_mode
    except (OSError, ValueError) as e:
        raise _read_error(p, e) from None
    kind = next((k for test, k in _KINDS if test(mode)), None)
    if kind is not None:
        raise DataError(f"data file {p} is {kind}, not a regular file",
                        "copy the data into a regular file and pass that", setting=FILES_SETTING)


def _read_error(p: Path | str, e: BaseException) -> DataError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return DataError(f"cannot read data file {p}: {why}",
                     "check that it exists, is readable, and is not a link loop",
                     setting=FILES_SETTING)


# --------------------------------------------------------------------------- reading units

def _decode(raw: bytes, first: bool) -> tuple[str, int]:
    """UTF-8 text and the number of undecodable sequences replaced by U+FFFD."""
    try:
        text = raw.decode("utf-8")
        replaced = 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD written in the file on purpose is not damage; count only what we replaced.
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    return (text.removeprefix("\ufeff") if first else text), replaced


def _empty_file(path: Path) -> DataError:
    return DataError(f"data file {path} is empty", "remove it from the data files or fill it")


def _json_lines(path: Path, field: str, block: int) -> Iterator[Unit]:
    """Blocks of whole lines. A newline byte never occurs inside a UTF-8 sequence, so a
    block decodes on its own."""
    line, carry, seen_text = 1, b"", False
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            buf = carry + data
            cut = len(buf) if not data else buf.rfind(b"\n") + 1
            if data and not cut:
                carry = buf  # a line longer than the block: read on
                continue
            chunk, carry = buf[:cut], buf[cut:]
            if not seen_text and chunk.strip():
                seen_text = True
                if path.suffix == ".json" and chunk.lstrip().startswith(b"["):
                    yield _json_array(path, field, chunk + carry + f.read())
                    return
            if seen_text and chunk:
                yield Unit(str(path), field, raw=chunk, line=line)
            line += chunk.count(b"\n")
            if not data:
                if not seen_text:
                    raise _empty_file(path)
                return


def _json_array(path: Path, field: str, raw: bytes) -> Unit:
    text, replaced = _decode(raw, True)
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}:{_json_problem(e)}",
                        "fix the file so it parses as a JSON array") from None
    docs = [_record(r, path, f"[{i}]", field) for i, r in enumerate(records)]
    return Unit(str(path), field, texts=docs, replaced=replaced)


def _parquet(path: Path, field: str) -> Iterator[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise _empty_file(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet file {path}: {e}",
                        "rewrite it with pyarrow or pandas .to_parquet()") from None
    if field not in pf.schema_arrow.names:
        raise _no_column(path, field, pf.schema_arrow.names)
    rows = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        rows += batch.num_rows
        yield Unit(str(path), field, texts=_text_column(batch.column(0), field, path),
                   keep_empty=True)
    if not rows:
        raise DataError(f"data set {path} has no rows", "remove it or add documents")


def _no_column(path: Path, field: str, names: Sequence[str]) -> DataError:
    return DataError(f"{path}: no column {field!r} (columns: {', '.join(names)})",
                     f"set {TEXT_FIELD_SETTING} to the column that holds the text",
                     setting=TEXT_FIELD_SETTING)


def _text_column(col, field: str, path: Path) -> list[str]:
    import pyarrow as pa

    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise DataError(f"{path}: column {field!r} has type {col.type}, not string",
                        f"set {TEXT_FIELD_SETTING} to a text column", setting=TEXT_FIELD_SETTING)
    if col.null_count:
        raise DataError(f"{path}: column {field!r} has {col.null_count} missing values",
                        "drop or fill the rows without text")
    return col.to_pylist()


def _saved(path: Path, field: str) -> Iterator[Unit]:
    import datasets

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
        raise _no_column(path, field, ds.column_names)
    if len(ds) == 0:
        raise DataError(f"data set {path} has no rows", "remove it or add documents")
    # The table is memory-mapped Arrow: batches are views, read as they are converted.
    for batch in ds.with_format(None).data.table.select([field]).to_batches(BATCH_ROWS):
        yield Unit(str(path), field, texts=_text_column(batch.column(0), field, path),
                   keep_empty=True)


def read_units(path: Path, field: str, *, block: int | None = None) -> Iterator[Unit]:
    """The work units of one resolved path, in order; file-level checks raise here."""
    block = block or BLOCK_BYTES
    try:
        if path.is_dir():
            yield from _saved(path, field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, field)
        elif path.suffix == ".txt":
            raw = path.read_bytes()
            if not raw.strip():
                raise _empty_file(path)
            yield Unit(str(path), field, raw=raw, line=0)  # line 0: the whole file is one text
        else:
            yield from _json_lines(path, field, block)
    except OSError as e:  # EIO, EISDIR, a file removed or replaced while read, ...
        raise _read_error(path, e) from None


# --------------------------------------------------------------------------- parsing units

def _record(obj, path: Path | str, where: str, field: str):
    """A document's text, (prompt, response), or a messages list; see the module doc."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}{where}: expected a JSON object, got {type(obj).__name__}",
                        'write one object per line, e.g. {"text": "..."}')
    if field in obj:
        return _string(obj, field, path, where)
    if "prompt" in obj and "response" in obj:
        return (_string(obj, "prompt", path, where), _string(obj, "response", path, where))
    if "messages" in obj:
        return _messages(obj["messages"], path, where)
    have = ", ".join(sorted(obj)) or "none"
    raise DataError(f"{path}{where}: no field {field!r} (fields: {have})",
                    f"set {TEXT_FIELD_SETTING} to the field that holds the text (or give "
                    "supervised examples as prompt + response, or messages)",
                    setting=TEXT_FIELD_SETTING)


def _string(obj: dict, key: str, path, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{path}{where}: field {key!r} is {type(value).__name__}, not a string",
                        "store the document text as a JSON string")
    return value


def _messages(msgs, path, where: str) -> list[dict]:
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in msgs)
    if not ok or msgs[-1]["role"] != "assistant":
        raise DataError(f"{path}{where}: 'messages' must be a list of "
                        '{"role": ..., "content": "..."} ending with an assistant turn',
                        "the last assistant message is the response the loss is taken on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _clean(text: str) -> tuple[str, int]:
    """Lone surrogates (from JSON \\ud800 escapes) cannot be stored as UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", errors="replace").decode("utf-8")
        return fixed, fixed.count("?") - text.count("?")


def _json_problem(e: BaseException, lineno: int | None = None) -> str:
    """`LINE: why` of a JSON value Python cannot parse: a syntax error, nesting deeper than
    the parser recurses, an integer longer than Python converts."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.lineno if lineno is None else lineno}: invalid JSON ({e.msg}, column {e.colno})"
    where = 1 if lineno is None else lineno
    if isinstance(e, RecursionError):
        return f"{where}: JSON nested too deeply to parse"
    return f"{where}: unreadable JSON value ({str(e).splitlines()[0]})"


def _parse_lines(unit: Unit) -> Parsed:
    text, replaced = _decode(unit.raw, unit.line == 1)
    out = Parsed(replaced=replaced)
    for lineno, line in enumerate(text.split("\n"), start=unit.line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{unit.path}:{_json_problem(e, lineno)}",
                            "fix or delete that line; each line must be one JSON object"
                            ) from None
        rec = _record(obj, unit.path, f":{lineno}", unit.field)
        if "\\u" in line and isinstance(rec, str):  # only escapes can smuggle in surrogates
            rec, n = _clean(rec)
            out.replaced += n
        out.records.append(rec)
    return out


def parse_unit(unit: Unit) -> Parsed:
    """Records of a unit; raises DataError naming the file and line of a bad record."""
    if unit.texts is not None:
        out = Parsed(records=list(unit.texts), replaced=unit.replaced)
    elif unit.line == 0:
        text, replaced = _decode(unit.raw, True)
        out = Parsed(records=[text], replaced=replaced)
    else:
        out = _parse_lines(unit)
    if not unit.keep_empty:
        kept = [r for r in out.records if r != ""]
        out.empty, out.records = len(out.records) - len(kept), kept
    return out


class FileTally:
    """Per-file checks that need every unit of the file: records at all, warnings."""

    def __init__(self, path: str):
        self.path, self.records, self.empty, self.replaced = path, 0, 0, 0

    def add(self, parsed: Parsed) -> None:
        self.records += len(parsed.records)
        self.empty += parsed.empty
        self.replaced += parsed.replaced

    def finish(self) -> int:
        """Raise for a file without documents; warn about replaced bytes; -> empty skipped."""
        if not self.records:
            if self.empty:
                raise DataError(f"data file {self.path} has only empty documents",
                                "remove it or add text")
            raise DataError(f"data file {self.path} has no records", "remove it or add documents")
        if self.replaced:
            warnings.warn(f"{self.path}: {self.replaced} undecodable byte sequence(s) replaced "
                          "with U+FFFD", DataWarning, stacklevel=4)
        return self.empty


def iter_records(paths: Sequence[Path], *, text_field: str = "text") -> Iterator[object]:
    """Every record of `paths`, in order, checked; streaming (see the module doc)."""
    empty = 0
    for path in paths:
        tally = FileTally(str(path))
        for unit in read_units(path, text_field):
            parsed = parse_unit(unit)
            tally.add(parsed)
            yield from parsed.records
        empty += tally.finish()
    if empty:
        warnings.warn(f"skipped {empty} empty document(s)", DataWarning, stacklevel=3)


def load_paths(paths: Sequence[Path], *, text_field: str = "text"):
    """Already-resolved paths as a `datasets.Dataset` with one `text` column (small data:
    tests and tools; training reads through `ringformer.data.cache`)."""
    import datasets

    texts = [r for r in iter_records(list(paths), text_field=text_field) if isinstance(r, str)]
    return datasets.Dataset.from_dict({"text": texts},
                                      features=datasets.Features({"text": datasets.Value("string")}))


def load_documents(files: str | Path | Sequence[str | Path], *, text_field: str = "text"):
    """All documents of `files` as a Dataset with one string column, `text`, in file order."""
    return load_paths(resolve_files(files), text_field=text_field)
