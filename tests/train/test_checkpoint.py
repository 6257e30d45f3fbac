"""Checkpointer: round trips, keep-N, resharding, and every way a checkpoint can be bad."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ringformer.config import default_config
from ringformer.errors import CheckpointError
from ringformer.optim import make_optimizer
from ringformer.train.checkpoint import MARKER, Checkpointer

ROOT = Path(__file__).resolve().parents[2]
AXES = ("dp", "fsdp", "sp", "tp")
OPTIM = {**default_config().optim, **dict(lr=1e-3, warmup_steps=0, schedule="constant", min_lr_ratio=0.1,
                                          weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8)}


def mesh(dp=1, fsdp=2, sp=4, tp=1):
    return Mesh(np.asarray(jax.devices()).reshape(dp, fsdp, sp, tp), AXES)


def make_state(m, *, seed=0, dim=16):
    """A trainer-like state: sharded params, AdamW state, step and a typed PRNG key."""
    k = jax.random.split(jax.random.key(seed), 3)
    wsh, rep = NamedSharding(m, P("fsdp", None)), NamedSharding(m, P())
    params = {
        "embed": jax.device_put(jax.random.normal(k[0], (dim, 8)), wsh),
        "layers": {"wq": jax.device_put(jax.random.normal(k[1], (2, dim, 8)),
                                        NamedSharding(m, P(None, "fsdp"))),
                   "attn_norm": jax.device_put(jnp.ones((2, 8)), rep)},
    }
    tx = make_optimizer(OPTIM, total_steps=10)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p) + seed, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed), "rng": k[2]}


def abstract(state, sharding_fn=None):
    def one(x):
        sh = x.sharding if sharding_fn is None else sharding_fn(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return jax.tree.map(one, state)


def assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save(ck, step, state, **kw):
    return ck.save(step, state, data_state={"pos": step * 10}, config_json={"model": {"dim": 16}}, **kw)


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.read_bytes() if p.is_file() else b"")
                  for p in Path(root).rglob("*"))


def largest_file(step_dir):
    return max((p for p in Path(step_dir).rglob("*") if p.is_file() and p.name != MARKER),
               key=lambda p: p.stat().st_size)


def test_round_trip_is_bitwise_with_data_and_config(tmp_path):
    m = mesh()
    state = make_state(m)
    with Checkpointer(tmp_path, keep=3) as ck:
        assert ck.latest_valid_step() is None
        assert save(ck, 5, state)
        ck.wait()
        assert ck.latest_valid_step() == 5
        got, data, config = ck.restore(None, abstract(state))
        assert ck.read_json(5) == ({"pos": 50}, {"model": {"dim": 16}})
    assert_bitwise(got, state)
    assert data == {"pos": 50} and config == {"model": {"dim": 16}}
    assert got["params"]["embed"].sharding == state["params"]["embed"].sharding
    assert (tmp_path / "checkpoints" / "5" / MARKER).is_file()


def test_relative_workdir_works(tmp_path, monkeypatch):
    """`--workdir runs/tiny` is relative; orbax itself only accepts absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh())
    with Checkpointer("runs/tiny", keep=2) as ck:
        assert save(ck, 1, state)
        ck.wait()
        got, _, _ = ck.restore(None, abstract(state))
    assert_bitwise(got, state)
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "1" / MARKER).is_file()


def test_keep_n_and_same_step_twice(tmp_path):
    m = mesh()
    state = make_state(m)
    with Checkpointer(tmp_path, keep=2, async_save=False) as ck:
        for step in (1, 2, 3, 4):
            assert save(ck, step, state)
        assert ck.all_steps() == [3, 4]
        assert not save(ck, 4, state)  # already there and valid: not written again
        newer = make_state(m, seed=1)
        assert save(ck, 4, newer, force=True)
        assert ck.all_steps() == [3, 4]
        assert_bitwise(ck.restore(4, abstract(state))[0], newer)
    assert not (tmp_path / "checkpoints" / "moved_aside").exists() or \
        not any((tmp_path / "checkpoints" / "moved_aside").iterdir())


def test_restore_onto_a_different_mesh(tmp_path):
    saved_on = mesh(fsdp=2, sp=4)
    state = make_state(saved_on)
    with Checkpointer(tmp_path, keep=1) as ck:
        save(ck, 1, state)
    other = mesh(dp=1, fsdp=1, sp=2, tp=4)

    def target(x):
        if x.ndim == 2 and x.shape[0] == 16:
            return NamedSharding(other, P(None, "tp"))
        return NamedSharding(other, P())

    with Checkpointer(tmp_path, keep=1) as ck:
        got, _, _ = ck.restore(1, abstract(state, target))
    assert_bitwise(got, state)
    assert got["params"]["embed"].sharding == NamedSharding(other, P(None, "tp"))
    assert got["params"]["layers"]["wq"].sharding == NamedSharding(other, P())


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "truncated"),
    ("flip", "checksum"),
    ("unmarked", "no COMMITTED marker"),  # killed between orbax's rename and our marker
    ("missing", "missing"),
])
def test_damaged_newest_falls_back_with_warning(tmp_path, caplog, damage, reason):
    m = mesh()
    old, new = make_state(m, seed=0), make_state(m, seed=1)
    with Checkpointer(tmp_path, keep=3) as ck:
        save(ck, 1, old)
        save(ck, 2, new)
    step2 = tmp_path / "checkpoints" / "2"
    victim = largest_file(step2)
    if damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "unmarked":
        (step2 / MARKER).unlink()
    else:
        victim.unlink()
    before = listing(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ringformer.train.checkpoint"), \
            Checkpointer(tmp_path, keep=3) as ck:
        assert ck.latest_valid_step() == 1
        got, data, _ = ck.restore(None, abstract(old))
        assert reason in ck.skipped[2]
    assert_bitwise(got, old)
    assert data == {"pos": 10}
    assert any("step 2" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert listing(tmp_path) == before  # restoring changed nothing on disk


def test_saving_over_an_invalid_step_moves_it_aside(tmp_path):
    m = mesh()
    state = make_state(m)
    with Checkpointer(tmp_path, keep=3, async_save=False) as ck:
        save(ck, 1, state)
        save(ck, 2, state)
    (tmp_path / "checkpoints" / "2" / MARKER).unlink()
    with Checkpointer(tmp_path, keep=3, async_save=False) as ck:
        assert ck.latest_valid_step() == 1
        with pytest.raises(CheckpointError, match="not usable"):
            ck.restore(2, abstract(state))
        assert save(ck, 2, state)
        assert ck.latest_valid_step() == 2
    aside = list((tmp_path / "checkpoints" / "moved_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("2.invalid.")


def test_all_damaged_raises_and_deletes_nothing(tmp_path):
    m = mesh()
    state = make_state(m)
    with Checkpointer(tmp_path, keep=3) as ck:
        save(ck, 1, state)
        save(ck, 2, state)
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / MARKER).unlink()
    before = listing(tmp_path)
    with Checkpointer(tmp_path, keep=3) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.latest_valid_step()
        assert "no valid checkpoint" in e.value.what and "step 2" in e.value.what
        assert "fresh --workdir" in e.value.fix
        with pytest.raises(CheckpointError, match="no valid checkpoint"):
            ck.restore(None, abstract(state))
    assert listing(tmp_path) == before


def test_incompatible_shapes_raise_naming_the_leaf(tmp_path):
    m = mesh()
    with Checkpointer(tmp_path, keep=3) as ck:
        save(ck, 1, make_state(m, dim=16))
    bigger = make_state(m, dim=32)
    with Checkpointer(tmp_path, keep=3) as ck, pytest.raises(CheckpointError) as e:
        ck.restore(None, abstract(bigger))
    assert "params.embed has shape (16, 8) in the checkpoint but (32, 8) in this run" in e.value.what
    assert "fresh --workdir" in e.value.fix
    extra = make_state(m)
    extra["params"]["final_norm"] = jnp.ones(8)
    with Checkpointer(tmp_path, keep=3) as ck, pytest.raises(CheckpointError) as e:
        ck.restore(1, abstract(extra))
    assert "params.final_norm is not in the checkpoint" in e.value.what
    unclipped = make_state(m)  # same model, optim.clip_norm=0: another optimizer tree
    unclipped["opt_state"] = make_optimizer({**OPTIM, "clip_norm": 0.0}, 10).init(unclipped["params"])
    with Checkpointer(tmp_path, keep=3) as ck, pytest.raises(CheckpointError) as e:
        ck.restore(1, abstract(unclipped))
    assert "different optimizer config" in e.value.what and "optim settings" in e.value.fix


def test_failed_background_commit_is_reported_and_leaves_step_invalid(tmp_path, monkeypatch):
    from ringformer.train import checkpoint_integrity

    state = make_state(mesh())
    with Checkpointer(tmp_path, keep=3) as ck:
        save(ck, 1, state)
        ck.wait()

        def broken(step_dir):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint_integrity, "file_table", broken)
        save(ck, 2, state)
        with pytest.raises(CheckpointError, match="No space left"):
            ck.wait()
        monkeypatch.undo()
        assert ck.latest_valid_step() == 1
        assert "no COMMITTED marker" in ck.skipped[2]


def test_checkpoints_path_that_is_a_file_is_refused_and_kept(tmp_path):
    (tmp_path / "checkpoints").write_text("precious\n")
    with pytest.raises(CheckpointError, match="is a file, not a directory of checkpoints") as e:
        Checkpointer(tmp_path, keep=3)
    assert "move that file aside" in e.value.fix
    assert (tmp_path / "checkpoints").read_text() == "precious\n"


def orbax_threads():
    from orbax.checkpoint._src.futures.future import _SignalingThread

    return [t for t in threading.enumerate() if isinstance(t, _SignalingThread) and t.is_alive()]


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_orbax_save_is_one_report(tmp_path, caplog, async_save):
    """Orbax cannot create the step directory (the checkpoints directory was replaced by a
    file after start, as a full or failing disk would fail it): it logged every handler
    thread's traceback, and re-raised the failure from every later wait. Now: one
    CheckpointError, no orbax error on the log, close() repeats nothing, and the save's
    threads, which waited 300 s at interpreter exit for a signal never sent, have ended."""
    state = {"w": jnp.ones(4)}
    ck = Checkpointer(tmp_path, keep=3, async_save=async_save)
    before = set(orbax_threads())
    ck.directory.rmdir()
    ck.directory.write_text("precious\n")
    with caplog.at_level(logging.INFO):
        with pytest.raises(CheckpointError, match=r"saving a checkpoint in .* failed") as e:
            save(ck, 1, state)
            ck.wait()
        assert "check free disk space" in e.value.fix
        ck.close()  # after the failure: no second error
    assert not set(orbax_threads()) - before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
    assert ck.directory.read_text() == "precious\n"


def test_orbax_errors_of_a_successful_save_are_not_hidden(tmp_path, caplog):
    """Orbax's error records are held only while a save is in flight, and shown as they were
    when that save succeeds."""
    import orbax.checkpoint._src.futures.future as orbax_future

    absl = logging.getLogger("absl")
    with Checkpointer(tmp_path, keep=3) as ck, caplog.at_level(logging.INFO):
        save(ck, 1, {"w": jnp.ones(4)})
        # as if logged by orbax's own code, from its file
        absl.handle(absl.makeRecord("absl", logging.ERROR, orbax_future.__file__, 1,
                                    "orbax says %s", ("boom",), None))
        assert "orbax says boom" not in caplog.text
        ck.wait()
        assert ck.latest_valid_step() == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["orbax says boom"]


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import jax, jax.numpy as jnp
    from ringformer.train.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep=3)
    ck.save(1, {"w": jnp.full((4,), 1.0)}, data_state={"pos": 1}, config_json={})
    ck.wait()
    big = jax.random.normal(jax.random.key(0), (2048, 2048))  # 16 MB: the write takes a while
    ck.save(2, {"w": big}, data_state={"pos": 2}, config_json={})
    os.kill(os.getpid(), signal.SIGKILL)  # the moment save() returns: orbax is mid-write
""")


def test_sigkill_during_async_write_resumes_from_previous(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(ROOT)], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "1" in names and any(n.startswith("2") for n in names), names
    with Checkpointer(tmp_path, keep=3) as ck:
        assert ck.latest_valid_step() == 1
        target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh(), P()))}
        got, data, _ = ck.restore(None, target)
        np.testing.assert_array_equal(np.asarray(got["w"]), np.ones(4, np.float32))
        assert data == {"pos": 1}
        # the resumed run saves step 2 again over whatever the killed write left
        ck.save(2, {"w": jnp.zeros(4)}, data_state={"pos": 2}, config_json={})
        ck.wait()
        assert ck.latest_valid_step() == 2


def test_pruning_deletes_only_its_own_committed_checkpoints(tmp_path):
    """Number-named directories that are not provably ours (a user's files, a step without
    its marker, a checkpoint someone added a file to) survive keep-N byte for byte."""
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    (ckdir / "1").mkdir()
    (ckdir / "1" / "photo.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    (ckdir / "2").mkdir()
    (ckdir / "2" / MARKER).write_text('{"format": 1, "step": 2, "files": {}}')
    (ckdir / "2" / "notes.txt").write_text("a marker that does not list this file")
    state = make_state(mesh())
    with Checkpointer(tmp_path, keep=1, async_save=False) as ck:
        save(ck, 3, state)
        (ckdir / "3" / "added.txt").write_text("mine")  # no longer provably a checkpoint
        save(ck, 4, state)
        save(ck, 5, state)
    assert (ckdir / "1" / "photo.jpg").read_bytes() == b"\xff\xd8 not a checkpoint"
    assert (ckdir / "2" / "notes.txt").read_text() == "a marker that does not list this file"
    assert (ckdir / "3" / "added.txt").read_text() == "mine"
    assert not (ckdir / "4").exists() and (ckdir / "5" / MARKER).is_file()


def test_a_non_finite_state_is_never_saved(tmp_path):
    """Whatever produced it, a state holding inf or NaN is refused before anything is written:
    otherwise it becomes the "last good checkpoint" every resume falls back to."""
    state = make_state(mesh())
    with Checkpointer(tmp_path, keep=3, async_save=False) as ck:
        save(ck, 1, state)
        before = listing(tmp_path)
        bad = {**state, "params": {**state["params"], "embed": state["params"]["embed"] * jnp.nan}}
        with pytest.raises(CheckpointError, match=r"state at step 2 holds non-finite values "
                                                  r"\(params\.embed\)"):
            save(ck, 2, bad)
        assert listing(tmp_path) == before
        assert ck.latest_valid_step() == 1


def test_a_forged_marker_without_files_is_not_pruned(tmp_path):
    """Found by tests/test_fuzz.py: a directory holding only a COMMITTED marker in our format
    with an empty file table counted as our checkpoint and was deleted; orbax always writes
    files, so such a directory is not ours."""
    ckdir = tmp_path / "checkpoints"
    (ckdir / "1").mkdir(parents=True)
    (ckdir / "1" / MARKER).write_text('{"format": 1, "step": 1, "files": {}}')
    with Checkpointer(tmp_path, keep=1, async_save=False) as ck:
        save(ck, 2, make_state(mesh()))
        save(ck, 3, make_state(mesh()))
    assert (ckdir / "1" / MARKER).read_text() == '{"format": 1, "step": 1, "files": {}}'


CLOSED_LOOP = """
import asyncio, sys, time
import tensorstore as ts
from ringformer.train import orbax_failures
orbax_failures.quiet_echoes_of_failed_saves()
# What a failed save leaves: a write finishing after orbax closed the loop that awaited it.
promise, future = ts.Promise.new()
async def wait_briefly():
    try:
        await asyncio.wait_for(asyncio.shield(future), 0.05)
    except TimeoutError:
        pass
loop = asyncio.new_event_loop()
loop.run_until_complete(wait_briefly())
loop.close()
promise.set_result(1)
time.sleep(0.3)
class Other:
    def __del__(self):
        raise ValueError("any other unraisable error")
Other()
"""


def test_writes_finishing_after_a_failed_save_print_nothing():
    """On a full disk tensorstore reported each write that finished after the failed save's
    loop was closed (`RuntimeError: Event loop is closed`, dozens of tracebacks around the one
    error line); other unraisable errors are still shown."""
    proc = subprocess.run([sys.executable, "-c", CLOSED_LOOP], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert "any other unraisable error" in proc.stderr
