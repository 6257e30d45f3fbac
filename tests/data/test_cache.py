"""The tokenized cache: built once, mapped after, rebuilt when stale or damaged, bad dirs."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ringformer.config import default_config
from ringformer.data import cache, cache_build, sources
from ringformer.data import pipeline as data
from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import DataError

TOK = load_tokenizer("byte")


def _corpus(tmp_path, n=40):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh \n"), int(k))) + f"#{i}"
            for i, k in enumerate(rng.integers(1, 300, n))]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs, path


def test_entry_holds_every_document_in_order(tmp_path, monkeypatch):
    docs, path = _corpus(tmp_path)
    monkeypatch.setattr(cache_build, "SHARD_TOKENS", 1000)  # several shards
    monkeypatch.setattr(sources, "BLOCK_BYTES", 500)  # many units, lines cut across blocks
    entry = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    assert len(entry.shards) > 2 and entry.manifest["n_docs"] == len(docs)
    assert entry.shards[0].dtype == np.uint16
    got = [TOK.decode(d) for d in cache.iter_documents(entry, TOK.eos_id)]
    assert got == docs
    assert cache.verify_entry(entry.path) is None


def test_pool_build_equals_inline_build(tmp_path, monkeypatch):
    _, path = _corpus(tmp_path, 300)
    inline = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "a"))
    monkeypatch.setattr(cache_build, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    pooled = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "b"), workers=2)
    for a, b in zip(cache.iter_documents(inline, 1), cache.iter_documents(pooled, 1),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_changed_source_rebuilds_and_stale_entry_goes(tmp_path):
    _docs, path = _corpus(tmp_path)
    root = tmp_path / "cc"
    first = cache.open_source(str(path), TOK, cache_dir=str(root))
    path.write_text(json.dumps({"text": "new"}) + "\n")
    os.utime(path, ns=(1, 1))  # a rewrite within the same mtime tick still changes the key
    second = cache.open_source(str(path), TOK, cache_dir=str(root))
    assert second.path != first.path and not first.path.exists()
    assert [TOK.decode(d) for d in cache.iter_documents(second, 1)] == ["new"]
    assert len(list(root.glob("tokens-*"))) == 1


@pytest.mark.parametrize("damage", ["truncate", "no_manifest", "index"])
def test_damaged_entry_is_caught_and_rebuilt(tmp_path, damage):
    docs, path = _corpus(tmp_path)
    entry = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    target = {"truncate": entry.path / "tokens-00000.bin",
              "no_manifest": entry.path / "manifest.json",
              "index": entry.path / "doc_len.npy"}[damage]
    if damage == "truncate":
        os.truncate(target, target.stat().st_size - 6)
    elif damage == "no_manifest":
        target.unlink()
    else:
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 0xFF
        target.write_bytes(bytes(raw))
    assert cache.entry_problem(entry.path) is not None
    with pytest.warns(sources.DataWarning, match="damaged"):
        again = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    assert [TOK.decode(d) for d in cache.iter_documents(again, 1)] == docs


def test_flipped_shard_byte_is_found_by_verify(tmp_path):
    _, path = _corpus(tmp_path)
    entry = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    shard = entry.path / "tokens-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    assert "CRC" in cache.verify_entry(entry.path)


def test_bad_cache_dirs_are_errors_and_write_nothing(tmp_path):
    _, path = _corpus(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "file"))
    with pytest.raises(DataError, match="cannot create"):  # a file where a parent should be
        cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "file" / "sub"))
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(DataError, match=r"not writable|cannot create"):
            cache.open_source(str(path), TOK, cache_dir=str(locked / "sub"))
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_bad_data_leaves_no_entry(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        cache.open_source(str(tmp_path / "bad.jsonl"), TOK, cache_dir=str(tmp_path / "cc"))
    assert not list((tmp_path / "cc").glob("tokens-*"))


def test_streaming_reader_bounds_units(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, path = _corpus(tmp_path, 200)
    units = list(sources.read_units(path, "text", block=1000))
    assert len(units) > 5 and max(len(u.raw) for u in units) < 2000
    assert all(u.raw.endswith(b"\n") for u in units)
    pq.write_table(pa.table({"text": [str(i) for i in range(10000)]}), tmp_path / "p.parquet",
                   row_group_size=1000)
    units = list(sources.read_units(tmp_path / "p.parquet", "text"))
    assert len(units) >= 3 and max(len(u.texts) for u in units) <= sources.BATCH_ROWS


def test_bad_cache_dir_is_one_error_line_exit_2(tmp_path):
    _, path = _corpus(tmp_path)
    (tmp_path / "file").write_text("x")
    c = default_config().data
    c.train_files, c.cache_dir, c.seq_len, c.global_batch_size = str(path), str(tmp_path / "file"), 16, 1
    code = ("from ringformer.launch.flags import run_main; "
            "from ringformer.data.pipeline import TrainIterator; "
            "from ringformer.data.tokenizer import load_tokenizer; "
            "import ml_collections; "
            f"c = ml_collections.ConfigDict({c.to_dict()!r}); "
            "run_main(lambda: TrainIterator(c, load_tokenizer('byte'), None, seed=0))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: data.cache_dir") and r.stderr.count("\n") == 1


def test_eval_reads_through_the_cache(tmp_path):
    docs, path = _corpus(tmp_path)
    c = default_config().data
    c.eval_files, c.cache_dir, c.seq_len, c.global_batch_size = str(path), str(tmp_path / "cc"), 32, 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged, nothing skipped
        batches = list(data.eval_host_batches(c, TOK))
    assert len(list((tmp_path / "cc").glob("tokens-*"))) == 1
    stream = np.concatenate([np.append(TOK.encode(d), 1) for d in docs])
    rows = np.concatenate([np.concatenate([b["tokens"], b["targets"][:, -1:]], 1)
                           for b in batches]).ravel()
    np.testing.assert_array_equal(rows[:len(stream)], stream)


@pytest.mark.parametrize("manifest", [
    "[]", "null", '{"version": %d}', '{"version": %d, "shards": "x", "index": {}}',
    '{"version": %d, "shards": [{"name": "tokens-00000.bin"}], "index": {}}',
    '{"version": %d, "shards": [], "index": {"doc_len.npy": {"bytes": "many"}}}',
])
def test_a_malformed_manifest_is_damage_not_a_traceback(tmp_path, manifest):
    """Valid JSON of the wrong shape in manifest.json (hand-edited, half-restored) made
    entry_problem raise KeyError or TypeError; it is damage: warned about and rebuilt."""
    docs, path = _corpus(tmp_path)
    entry = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    text = manifest % cache_build.CACHE_VERSION if "%d" in manifest else manifest
    (entry.path / "manifest.json").write_text(text)
    assert cache.entry_problem(entry.path) is not None
    with pytest.warns(sources.DataWarning, match="damaged"):
        again = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    assert [TOK.decode(d) for d in cache.iter_documents(again, 1)] == docs


@pytest.mark.parametrize("damage", ["no dtype", "float dtype", "no doc_len", "shard outside"])
def test_a_manifest_missing_what_the_entry_reads_is_damage(tmp_path, damage):
    """A manifest that passed the shape check but lacked `dtype` (or an index file) raised
    KeyError when the entry was opened; a shard named outside the entry was read."""
    docs, path = _corpus(tmp_path)
    entry = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    m = json.loads((entry.path / "manifest.json").read_text())
    if damage == "no dtype":
        del m["dtype"]
    elif damage == "float dtype":
        m["dtype"] = "float32"
    elif damage == "no doc_len":
        del m["index"]["doc_len.npy"]
    else:
        m["shards"][0]["name"] = "../../c.jsonl"
    (entry.path / "manifest.json").write_text(json.dumps(m))
    assert cache.entry_problem(entry.path) is not None
    with pytest.warns(sources.DataWarning, match=f"tokenized cache {entry.path} is damaged"):
        again = cache.open_source(str(path), TOK, cache_dir=str(tmp_path / "cc"))
    assert [TOK.decode(d) for d in cache.iter_documents(again, 1)] == docs
    assert json.loads(path.read_text().splitlines()[0])["text"] == docs[0]  # the data is kept


def test_a_file_at_the_entry_or_a_directory_at_the_lock_is_refused_and_kept(tmp_path):
    """A regular file where the entry goes was read as a damaged entry, then the rename of the
    rebuilt one onto it failed with a traceback; a directory at the lock path was an
    IsADirectoryError traceback. Neither is the cache's to delete: one DataError each."""
    _, path = _corpus(tmp_path)
    root = tmp_path / "cc"
    entry = cache.open_source(str(path), TOK, cache_dir=str(root)).path
    shutil.rmtree(entry)
    entry.write_text("not a cache entry\n")
    with pytest.raises(DataError, match=f"tokenized cache entry {entry} is a file"):
        cache.open_source(str(path), TOK, cache_dir=str(root))
    assert entry.read_text() == "not a cache entry\n"
    entry.unlink()
    lock = next(root.glob(".tokens-*.lock"))
    lock.unlink()
    (lock / "mine").mkdir(parents=True)
    with pytest.raises(DataError, match=f"cannot open the tokenized cache's lock file {lock}"):
        cache.open_source(str(path), TOK, cache_dir=str(root))
    assert (lock / "mine").is_dir()
