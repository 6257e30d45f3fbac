"""scripts/prepare_data.py builds the default corpus, idempotently, from this machine's stdlib."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringformer.data import corpus
from ringformer.data import pipeline as data
from ringformer.data.corpus import split_of, stdlib_files, stdlib_root

ROOT = Path(__file__).resolve().parents[2]


def _run(out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"),
                           "--out", str(out), "--limit", "60", "--passkey-lengths", "512,1024",
                           "--passkey-depths", "0,0.5,1", *extra],
                          capture_output=True, text=True, timeout=120)


def test_short_passkey_length_is_refused_before_the_corpus(tmp_path):
    r = _run(tmp_path, "--passkey-lengths", "20")
    assert r.returncode == 2 and "shorter than the bare prompt" in r.stderr
    assert not (tmp_path / "stdlib").exists()


def test_prepare_data_writes_the_corpus(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    train = [json.loads(x) for x in (tmp_path / "stdlib" / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "stdlib" / "eval.jsonl").read_text().splitlines()]
    assert len(train) + len(evals) == 60
    root = stdlib_root()
    for rec, split in [(r, "train") for r in train] + [(r, "eval") for r in evals]:
        assert set(rec) == {"text", "path"}
        assert split_of(rec["path"]) == split
        assert rec["text"] == (root / rec["path"]).read_bytes().decode("utf-8", "replace")
    passkey = [json.loads(x) for x in
               (tmp_path / "passkey" / "passkey.jsonl").read_text().splitlines()]
    assert len(passkey) == 6
    assert all(p["text"].endswith("The pass key is " + p["key"]) for p in passkey)
    # The output is ordinary data for the pipeline.
    assert len(data.load_documents(str(tmp_path / "stdlib" / "*.jsonl"))) == 60

    # Second run: nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")}
    r2 = _run(tmp_path)
    assert r2.returncode == 0 and "up to date" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jsonl")} == mtimes
    # --force rebuilds anyway.
    assert "written" in _run(tmp_path, "--force").stdout


def test_bad_option_is_one_line_error(tmp_path):
    r = _run(tmp_path / "a", "--passkey-depths", "0,2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr
    r = _run(tmp_path / "b", "--passkey_lengths", "20")  # the spelling of the other scripts
    assert r.returncode == 2 and "shorter than the bare prompt" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--passkey-lengths", "10000000000"],
     "error: --passkey_lengths 10000000000 is longer than the 16777216 tokens"),
    (["--limit", "0"], "error: argument --limit: must be at least 1, not 0"),
    (["--limit", "-1"], "error: argument --limit: must be at least 1, not -1"),
    (["--passkey_lengths", ""], "error: --passkey_lengths and --passkey_depths need at least one"),
    (["--passkey-depths", ""], "error: --passkey_lengths and --passkey_depths need at least one"),
    (["--seed", "-1"], "error: argument --seed: must be at least 0"),
])
def test_bad_option_is_refused_before_anything_is_built(tmp_path, args, message):
    """Refused at once (the passkey file used to be built only after the whole corpus, and a huge
    length ran for minutes into a MemoryError), and nothing is written."""
    r = _run(tmp_path / "out", *args)
    assert r.returncode == 2 and r.stderr.startswith(message), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_split_is_stable_and_about_five_percent():
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    root = stdlib_root()
    rels = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    share = sum(split_of(r) == "eval" for r in rels) / len(rels)
    assert 0.02 < share < 0.09
    assert not any("site-packages" in r or "/test/" in f"/{r}" for r in rels)


@pytest.mark.parametrize("damage", ["[]", '{"signature": "SIG"}', '{"signature": "SIG", "summary": 3}',
                                    "truncated_output", "garbage"])
def test_a_damaged_manifest_or_output_is_rebuilt(tmp_path, damage):
    """The prepared corpus' hidden manifest decides whether the files are rebuilt: JSON of the
    wrong shape raised KeyError/TypeError, and a truncated output file passed as up to date."""
    out = tmp_path / "passkey.jsonl"
    first = corpus.build_passkey_file(out, lengths=(512,), depths=(0.5,))
    good = out.read_bytes()
    manifest = tmp_path / ".passkey.manifest.json"
    sig = json.loads(manifest.read_text())["signature"]
    if damage == "truncated_output":
        out.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        manifest.write_bytes(b"\xff\x00 not json")
    else:
        manifest.write_text(damage.replace("SIG", sig))
    again = corpus.build_passkey_file(out, lengths=(512,), depths=(0.5,))
    assert not again["skipped"] and again["documents"] == first["documents"]
    assert out.read_bytes() == good
    assert corpus.build_passkey_file(out, lengths=(512,), depths=(0.5,))["skipped"]
