"""Fuzzing the bad-input promise (docs/reliability.md): generated config values, malformed data
files and damaged workdirs either work or end as one UserError (one `error:` line, exit 2
through a script), and nothing the user had changes.

Cheap by design: most properties call the validation and reading functions in process; a few
examples run scripts/train.py (inputs that fail before any compile). The number of examples
per property is small in CI; RINGFORMER_FUZZ_EXAMPLES=500 runs a longer campaign (the seed is
then random, so each campaign explores new inputs; CI's is fixed, so a failure reproduces).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringformer import config as config_lib
from ringformer import limits
from ringformer.data import cache, sources
from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import UserError
from ringformer.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")
EXAMPLES = int(os.environ.get("RINGFORMER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 25, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=list(HealthCheck))
SCRIPT_FUZZ = settings(FUZZ, max_examples=max(EXAMPLES // 20, 5))
SAVE_FUZZ = settings(FUZZ, max_examples=max(EXAMPLES // 5, 6))  # ~2 s an example (orbax saves)
TOK = load_tokenizer("byte")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_one_line(e: UserError) -> None:
    assert "\n" not in str(e), str(e)
    assert e.what and e.fix, str(e)


def smoke_config():
    from ringformer.config import config_module

    return config_module(SMOKE).get_config()


# ----------------------------------------------------------------------------- config values

KEYS = [(s, k) for s, keys in config_lib.default_config().items() for k in keys]
NUMBERS = st.one_of(
    st.integers(-3, 3), st.integers(), st.sampled_from([2**31 - 1, 2**31, 2**40, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e39, -1e39, 5e-324, 3.5e38]))
VALUES = st.one_of(NUMBERS, st.booleans(), st.text(max_size=20), st.none(),
                   st.sampled_from(["", "none", "ring", "zigzag", "llama3", "float16", "\x00"]))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_config_values_are_usable_or_one_error(changes):
    """Whatever values a config file sets, validation accepts a config everything downstream
    can build from, or raises one ConfigError; never another exception."""
    config = smoke_config()
    with config.unlocked():
        for (section, key), value in changes:
            # ml_collections refuses a wrong type on assignment, as the flag parser does
            with contextlib.suppress(TypeError, ValueError):
                config[section][key] = value
    try:
        config_lib.validate(config, 8)
        limits.check_fits(config)
    except UserError as e:
        assert_one_line(e)
        return
    for section, key in KEYS:  # accepted: every number is one jax and float32 hold
        v = config[section][key]
        if isinstance(v, float):
            assert math.isfinite(v) and abs(v) <= limits.FLOAT32_MAX, (section, key, v)
        elif isinstance(v, int) and not isinstance(v, bool):
            assert limits.INT32_MIN <= v <= limits.INT32_MAX, (section, key, v)
    model_cfg = config_lib.ModelConfig.from_config(config)
    assert model_cfg.head_dim > 0


# ----------------------------------------------------------------------------- data files

def _nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n"


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["text", "prompt", "response", "messages",
                                                             "role", "content"]), inner, max_size=3)),
    max_leaves=8)
GOOD_LINES = st.lists(st.text(max_size=30).map(lambda t: json.dumps({"text": t}).encode() + b"\n"),
                      min_size=1, max_size=5).map(b"".join)
DATA = st.one_of(
    st.binary(max_size=300),  # random bytes, empty files
    GOOD_LINES.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # truncated
    st.lists(JSON_VALUES.map(lambda v: json.dumps(v).encode()), min_size=1, max_size=4)
      .map(lambda lines: b"\n".join(lines)),  # wrong types and fields
    st.integers(1, 200_000).map(_nested),  # deep nesting
    st.sampled_from([b"", b"\n\n", b"   ", b'{"text": ""}\n', b"\xef\xbb\xbf", b'{"text": "a"}' * 3]),
)


@FUZZ
@given(content=DATA, suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_data_files_read_or_fail_as_one_error(tmp_path_factory, content, suffix):
    """Reading and tokenizing (into the cache) either works or is one DataError naming the
    file; the data file itself is never changed."""
    d = tmp_path_factory.mktemp("data")
    path = d / f"data{suffix}"
    path.write_bytes(content)
    before = snapshot(d)
    try:
        cache.open_source(str(path), TOK, cache_dir=str(tmp_path_factory.mktemp("cache")), workers=1)
    except UserError as e:
        assert_one_line(e)
        assert str(path) in e.what, e.what
    assert snapshot(d) == before


# ----------------------------------------------------------------------------- damaged workdirs

ENTRY = st.tuples(
    # Not `N.orbax-checkpoint-tmp-*`: orbax's own unfinished writes, removed by design.
    st.sampled_from(["1", "2", "3", "7", "10", "00", "²", "moved_aside", "junk", ".lock"]),
    st.sampled_from(["dir", "file", "dir+marker", "dir+bad_marker", "dir+file"]),
    st.binary(max_size=64))


def _make_entry(root: Path, name: str, kind: str, payload: bytes) -> None:
    p = root / name
    if kind == "file":
        p.write_bytes(payload)
        return
    p.mkdir(exist_ok=True)
    if kind == "dir+marker":
        (p / "COMMITTED").write_text(json.dumps({"format": 1, "step": int(name) if name.isdigit()
                                                 and name.isascii() else 0, "files": {}}))
    elif kind == "dir+bad_marker":
        (p / "COMMITTED").write_bytes(payload)
    elif kind == "dir+file":
        (p / "data").write_bytes(payload)


@SAVE_FUZZ
@given(entries=st.lists(ENTRY, max_size=6, unique_by=lambda e: e[0]), keep=st.integers(1, 2))
def test_damaged_checkpoint_dirs_are_judged_and_kept(tmp_path_factory, entries, keep):
    """Junk in checkpoints/: judging it is a step or one CheckpointError, and a save beside it
    (with keep-N pruning) leaves every file that was there byte for byte."""
    workdir = tmp_path_factory.mktemp("run")
    ckdir = workdir / "checkpoints"
    ckdir.mkdir()
    for name, kind, payload in entries:
        _make_entry(ckdir, name, kind, payload)
    before = snapshot(workdir)
    with Checkpointer(workdir, keep=keep, async_save=False) as ck:
        try:
            ck.latest_valid_step()
        except UserError as e:
            assert_one_line(e)
        for step in (20, 21):
            ck.save(step, {"w": jnp.arange(4.0)}, data_state={}, config_json={})
    after = snapshot(workdir)
    assert {k: after.get(k) for k in before} == before


# ----------------------------------------------------------------------------- through the script

SCRIPT_CASES = st.one_of(
    st.tuples(st.just("data"), DATA.filter(lambda b: b[:1] not in (b"{", b" ", b"\n", b"\t", b"\r")
                                           and b.strip() != b"")),
    st.tuples(st.just("flag"), st.sampled_from(
        ["--config.optim.lr=inf", "--config.optim.lr=nan", "--config.model.rope_theta=-inf",
         f"--config.train.seed={2**40}", "--config.model.dim=1e400", "--config.optim.b2=1.5",
         "--config.model.dim=67108864", "--config.data.seq_len=99999999999"])),
)


@SCRIPT_FUZZ
@given(case=SCRIPT_CASES)
def test_train_script_fails_as_one_line_and_changes_nothing(tmp_path_factory, case):
    """scripts/train.py on an existing run's workdir with bad data or a bad value: exit 2, one
    `error:` line, no traceback, within a minute, and the workdir byte for byte as it was."""
    home = tmp_path_factory.mktemp("home")
    workdir = home / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"note": "an existing run"}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    data = home / "data.jsonl"
    data.write_text('{"text": "ring attention over devices"}\n' * 20)
    kind, value = case
    args = [f"--config.data.train_files={data}"]
    if kind == "data":
        data.write_bytes(value)
    else:
        args.append(value)
    before = snapshot(home)
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", SMOKE, "--workdir", str(workdir),
         "--config.data.eval_files=", f"--config.data.cache_dir={home / 'cache'}",
         "--config.train.steps=1", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and lines and lines[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    after = snapshot(home)
    assert {k: after.get(k) for k in before if not k.startswith("cache")} == {
        k: v for k, v in before.items() if not k.startswith("cache")}


@pytest.mark.parametrize("name", ["sources", "limits"])
def test_the_fuzzed_modules_are_the_ones_in_use(name):
    """Guard against fuzzing a copy: the modules above are the package's own."""
    module = {"sources": sources, "limits": limits}[name]
    assert Path(module.__file__).is_relative_to(ROOT / "ringformer")
