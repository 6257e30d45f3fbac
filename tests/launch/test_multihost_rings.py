"""Rings that cross processes, and evaluation, generation and export from several processes.

Two processes x four CPU devices. With sp=8 the ring crosses the process boundary twice per
cycle (devices 3->4 and 7->0); with sp=4, tp=2 (conftest's `runs`) the ring of each tp column
runs 0->2->4->6, crossing at 2->4 and 6->0 (`make_mesh` lays tp, then sp, over a host's devices
first). Both must train like one process with eight devices; the sp=8 run is SIGKILLed
mid-run, restarted, and must replay the lost steps bitwise. Its final checkpoint then serves
eval, generation and export, each run as two processes and compared with one process.

Cost: one training run killed and restarted (the others are conftest's, shared with
test_multihost.py), two-process eval, generation and export; the one-process eval and
generation run in the test process on its own 8 devices.
"""

import contextlib
import io
import json
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
from _multiproc import SP8, Group, column, logged_step, rows, run_script, run_to_end, start_processes

MESH8 = {"dp": 1, "fsdp": 1, "sp": 8, "tp": 1}
PROMPTS = ("def main(", "import os")


def _group(base, name):
    return Group(base / f"logs-{name}")


def _kill_mid_run(base, corpus):
    """Two processes on sp=8 until step 2 is committed and a later step logged, then SIGKILL
    process 1; returns the rows logged before the kill and the checkpoint resumed from."""
    from ringformer.train.checkpoint import Checkpointer

    run, g = base / "run", _group(base, "killed")
    try:
        start_processes(g, 2, run, corpus, *SP8, evals=False)
        deadline = time.monotonic() + 300
        while not ((run / "checkpoints" / "2" / "COMMITTED").exists() and logged_step(run) >= 3):
            assert all(p.poll() is None for p in g.procs), g.stderr(0)[-2000:]
            assert time.monotonic() < deadline, "step 3 was never logged"
            time.sleep(0.02)
        assert logged_step(run) < 6, "the run ended before the kill; nothing was tested"
        g.procs[1].send_signal(signal.SIGKILL)
        # The survivor leaves on its own (test_multihost.py bounds how fast); not waited for.
        with contextlib.suppress(subprocess.TimeoutExpired):
            g.procs[0].wait(timeout=5)
    finally:
        g.kill_all()
    with Checkpointer(run, keep=3) as ck:
        resumed_from = ck.latest_valid_step()
    return rows(run), resumed_from


@pytest.fixture(scope="module")
def sp8(corpus, tmp_path_factory):
    """sp=8 on 2 processes, SIGKILLed mid-run and restarted: (workdir, rows logged before
    the kill, the checkpoint step the restart resumed from)."""
    base = tmp_path_factory.mktemp("sp8")
    before, resumed_from = _kill_mid_run(base, corpus)
    g = _group(base, "restart")
    try:
        run_to_end(g, 2, base / "run", corpus, *SP8, evals=False)
    finally:
        g.kill_all()
    return base / "run", before, resumed_from


def final_params(workdir):
    import jax

    from ringformer.train.state import restore_run

    _, state = restore_run(workdir, MESH8, step=6)
    return {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}


@pytest.mark.slow  # the first user of `sp8`: its setup is the killed and restarted run
@pytest.mark.parametrize("mesh", ["sp8", "sp4_tp2"])
def test_a_ring_across_processes_trains_like_one_process(runs, sp8, mesh):
    """Against one process on sp=8 (conftest's `runs[1]`): same model, same batches."""
    two, one = (sp8[0] if mesh == "sp8" else runs[2]), runs[1]
    for key in ("loss", "grad_norm"):
        a, b = column(two, key), column(one, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6], key
        np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, err_msg=key)
    pa, pb = final_params(two), final_params(one)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-5, err_msg=k)
    saved = json.loads((two / "config.json").read_text())["mesh"]
    assert (saved["sp"], saved["tp"]) == ((8, 1) if mesh == "sp8" else (4, 2))


@pytest.mark.slow
def test_a_sigkilled_two_process_run_resumes_bitwise(sp8):
    """The steps logged after the checkpoint the restart resumed from are computed again by
    the restarted processes: exactly the same numbers, not merely close ones."""
    workdir, before, resumed_from = sp8
    replayed = [r for r in before if "loss" in r and r["step"] > resumed_from]
    assert resumed_from in (2, 4) and replayed, (resumed_from, before)
    after = {r["step"]: r for r in rows(workdir) if "loss" in r}
    for r in replayed:
        assert (r["loss"], r["grad_norm"]) == (after[r["step"]]["loss"],
                                               after[r["step"]]["grad_norm"]), r["step"]
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # one row per step: only process 0 logs


def test_the_mesh_puts_tp_then_sp_inside_a_host():
    """The layout the two-process runs above rely on, with fake devices of 2 processes."""
    from ringformer.mesh import AXES, crossing_axes, device_grid

    devices = [SimpleNamespace(id=i, process_index=i // 4, platform="cpu")
               for i in (5, 1, 7, 3, 0, 4, 2, 6)]  # listed out of order on purpose
    for shape, crossing in (((1, 1, 8, 1), ("sp",)), ((1, 1, 4, 2), ("sp",)),
                            ((1, 2, 4, 1), ("fsdp",)), ((2, 1, 2, 2), ("dp",))):
        grid = device_grid(devices, shape)
        assert crossing_axes(SimpleNamespace(devices=grid, axis_names=AXES)) == crossing
    ring = [d.id for d in device_grid(devices, (1, 1, 4, 2))[0, 0, :, 0]]
    assert ring == [0, 2, 4, 6]  # hops 2->4 and 6->0 cross processes


def _strip(result):
    """An eval result without the path of its plot (each run writes its own)."""
    return {k: v for k, v in result.items() if k != "plot"}


def assert_same_numbers(a, b, path="result"):
    """Equal structure, strings and integers; floats to 1e-5 (summed in another order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=path)
    else:
        assert a == b, (path, a, b)


def test_eval_on_two_processes_gives_the_json_of_one(sp8, corpus, tmp_path):
    from ringformer.eval.tool import run

    workdir, data = sp8[0], corpus[1]
    g = _group(tmp_path, "eval")
    try:
        run_script(g, 2, "eval.py", "--workdir", workdir, "--data", data, "--context", 128,
                   "--mesh", "dp=1,fsdp=1,sp=8,tp=1", "--out", tmp_path / "two" / "r.json")
    finally:
        g.kill_all()
    two = json.loads((tmp_path / "two" / "r.json").read_text())
    one = run(data=[str(data)], context=128, out=str(tmp_path / "one" / "r.json"),
              workdir=str(workdir), mesh_sizes=MESH8, progress=False)
    one = json.loads(json.dumps(one))  # tuples as lists, as the file has them
    assert_same_numbers(_strip(two), _strip(one))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r.json", "r.png"]
    said = [g.logs / f"stdout.{i}" for i in range(2)]
    assert ["ppl " in p.read_text() for p in said] == [True, False]  # process 0 reports


def test_generation_on_two_processes_gives_the_json_of_one(sp8, tmp_path):
    """--json with two prompts shows the progress bar on process 0 only: the decode program
    must still be the same on both (it was not, and gloo aborted)."""
    from ringformer.generate.tool import run

    workdir = sp8[0]
    g = _group(tmp_path, "generate")
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    try:
        run_script(g, 2, "generate.py", "--workdir", workdir, *args, "--max_new_tokens", 8,
                   "--json", "--mesh", "dp=1,fsdp=1,sp=8,tp=1")
        two, silent = g.json_lines(0), g.json_lines(1)
    finally:
        g.kill_all()
    one = run(prompts=list(PROMPTS), max_new_tokens=8, workdir=str(workdir), mesh_sizes=MESH8,
              json_lines=True, out=io.StringIO(), progress=False)
    keep = ("prompt", "text", "tokens")
    assert [{k: r[k] for k in keep} for r in two] == [{k: r[k] for k in keep} for r in one]
    assert len(two[0]["tokens"]) == 8 and silent == []  # process 1 prints nothing


@pytest.mark.slow
def test_export_from_two_processes_writes_shards_that_transformers_loads(sp8, tmp_path):
    from safetensors import safe_open

    from ringformer.hf import load_llama

    out = tmp_path / "hf"
    g = _group(tmp_path, "export")
    try:
        run_script(g, 2, "convert_hf.py", "export", "--workdir", sp8[0], "--out", out)
    finally:
        g.kill_all()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json", "config.json"])
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for s in shards:
        with safe_open(str(out / s), "np") as f:
            held.update({k: s for k in f.keys()})  # noqa: SIM118 (safe_open is no dict)
    assert held == weight_map and set(held.values()) == set(shards)  # each tensor once
    _, params = load_llama(str(out))
    want = final_params(sp8[0])
    for path, x in zip(want, jax_leaves(params), strict=True):
        np.testing.assert_array_equal(x, want[path], err_msg=path)

    import torch
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(out)
    logits = hf_model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 259) and torch.isfinite(logits).all()


def jax_leaves(params):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_export_copies_a_local_tokenizer(tmp_path):
    from transformers import AutoTokenizer, ByT5Tokenizer

    from ringformer.hf.sharded import copy_tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "hf").mkdir()
    copied = copy_tokenizer(str(tmp_path / "tok"), str(tmp_path / "hf"))
    assert "tokenizer_config.json" in copied
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("ab") == \
        ByT5Tokenizer().encode("ab")
    assert copy_tokenizer("byte", str(tmp_path / "hf")) == []
