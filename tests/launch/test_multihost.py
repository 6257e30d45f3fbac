"""Multi-process training on JAX's distributed runtime, on one machine over loopback.

Two processes with 4 virtual CPU devices each (gloo collectives) on (sp=4, tp=2), so that
the ring crosses the process boundary, must train exactly like one process with 8 on sp=8;
their checkpoint must resume in one process on another mesh; and a process that fails or
dies must take the others down promptly instead of leaving them blocked in a collective.
Every process started here is killed at the end of its test, whatever happens.

Cost: two smoke runs shared by the comparison and the resume test (`runs` in conftest.py,
shared with test_multihost_rings.py), one resumed run, and a few runs that stop early.
"""

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from _multiproc import EXIT_WAIT_S, HEARTBEAT_S, KV2, column, rows, run_to_end, start_processes


def test_two_processes_train_like_one(runs):
    two, one = runs[2], runs[1]
    for key in ("loss", "grad_norm", "eval_loss"):
        a, b = column(two, key), column(one, key)
        assert sorted(a) == sorted(b) and a, key
        np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)],
                                   rtol=1e-5, err_msg=key)
    # Only process 0 writes outputs: one metrics row per step, not one per process.
    assert [r["step"] for r in rows(two) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows(two) if "eval_loss" in r] == [3, 6]
    assert (two / "config.json").is_file() and any((two / "tb").iterdir())
    from ringformer.train.checkpoint import Checkpointer

    with Checkpointer(two, keep=3) as ck:
        # All committed, and the final save (step 6 again) agreed on by both processes.
        assert ck.all_steps() == [2, 4, 6] and ck.latest_valid_step() == 6
        data_state, config_json = ck.read_json(6)
    assert data_state["batches"] == 6
    assert (config_json["mesh"]["sp"], config_json["mesh"]["tp"]) == (4, 2)


def test_one_process_yields_the_rows_two_processes_would(corpus):
    """The data half of the comparison above, in-process: on (fsdp=2, sp=4) one process
    holds both batch shards and stacks exactly the rows that each of two processes yields."""
    import ml_collections

    from ringformer.data import pipeline as data
    from ringformer.data.tokenizer import load_tokenizer
    from ringformer.mesh import make_mesh
    from ringformer.ops import layouts as layout

    cfg = ml_collections.ConfigDict({"train_files": str(corpus[0]), "seq_len": 64,
                                     "global_batch_size": 4})
    tok = load_tokenizer("byte")
    whole = data.TrainIterator(cfg, tok, make_mesh({"dp": 1, "fsdp": 2, "sp": 4, "tp": 1}),
                               seed=3, layout="zigzag")
    halves = [data.TrainIterator(cfg, tok, None, seed=3, process_index=p, process_count=2)
              for p in range(2)]
    whole.restore({"seed": 3, "batches": 5})
    for h in halves:
        h.restore({"seed": 3, "batches": 5})
    for _ in range(3):
        got = whole.next_host_batch()
        want = [h.next_host_batch() for h in halves]
        for k in data.FIELDS:
            stacked = np.concatenate([w[k] for w in want])
            np.testing.assert_array_equal(got[k], layout.permute(stacked, "zigzag", 4, axis=1))
    assert whole.state()["batches"] == 8


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, corpus, group,
                                                                       tmp_path):
    """Elastic resume: written by 2 processes on (sp=4, tp=2), continued by 1 on (fsdp=1,
    sp=8). The data position (batches consumed) carries over; with dp*fsdp=1 on both meshes
    the stream continues exactly (docs/multihost.md covers a change of batch shards)."""
    import jax

    from ringformer import model
    from ringformer.data import pipeline as data
    from ringformer.data.tokenizer import load_tokenizer
    from ringformer.mesh import make_mesh
    from ringformer.train.state import restore_run

    workdir = tmp_path / "run"
    shutil.copytree(runs[2], workdir)
    new_mesh = {"dp": 1, "fsdp": 1, "sp": 8, "tp": 1}
    run_to_end(group, 1, workdir, corpus, "--config.mesh.fsdp=1", "--config.mesh.sp=8",
               "--config.mesh.tp=1", KV2, "--config.train.steps=8", evals=False)
    losses = column(workdir, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 7, 8]  # appended after the 2-process rows
    assert losses[7] < losses[1] - 0.5  # continues from trained weights, not a fresh start

    # Step 7's loss is exactly that of the restored step-6 parameters, placed on the new mesh,
    # on the batch the one-process iterator yields after the 6 batches the checkpoint counted.
    config, state = restore_run(workdir, new_mesh, step=6)
    assert int(state.step) == 6
    mesh = make_mesh(new_mesh)
    assert all(x.sharding.mesh.shape["sp"] == 8 for x in jax.tree.leaves(state.params))
    it = data.TrainIterator(config.data, load_tokenizer(config.data.tokenizer), mesh,
                            seed=config.train.seed, layout=config.attention.layout)
    it.restore({"seed": config.train.seed, "batches": 6})
    loss_sum, n = jax.jit(lambda p, b: model.loss_fn(model.ModelConfig.from_config(config), p, b,
                                                     mesh=mesh))(state.params, next(it))
    np.testing.assert_allclose(float(loss_sum) / float(n), losses[7], rtol=1e-5)


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_on_one_process_stops_all_with_the_message(corpus, group, tmp_path, failing):
    """A data error that only one process sees (its train file is missing) must end every
    process with that message, including the one already waiting in a collective for it."""
    train, _ = corpus
    missing = tmp_path / "missing.jsonl"
    files = [str(missing) if i == failing else str(train) for i in range(2)]
    start_processes(group, 2, tmp_path / "run", corpus, train_files=files)
    try:
        codes = group.wait_all(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("a process hung after its peer failed: " + group.stderr(1 - failing)[-2000:])
    assert codes == [2, 2], [group.stderr(i)[-2000:] for i in range(2)]
    assert f"error: data file {missing} does not exist" in group.stderr(failing)
    other = group.stderr(1 - failing)
    assert f"error: process {failing} of 2 failed, stopping process {1 - failing}: " \
           f"data file {missing} does not exist" in other, other[-2000:]


def start_endless_run(group, workdir, corpus):
    """Two processes on a run that cannot end on its own, once both are training (a step is
    logged). No evaluation and no periodic checkpoint: nothing else to compile."""
    start_processes(group, 2, workdir, corpus, "--config.train.steps=1000",
                    "--config.train.save_every=1000", evals=False)
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").is_file() or not rows(workdir):
        assert all(p.poll() is None for p in group.procs), group.stderr(0)[-2000:]
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.1)
    return group.procs


def test_a_killed_process_takes_the_other_down(corpus, group, tmp_path):
    """SIGKILL leaves no chance to say anything: the survivor, blocked in a collective, learns
    from the coordination service's missed heartbeats and exits instead of hanging."""
    p0, p1 = start_endless_run(group, tmp_path / "run", corpus)
    p1.send_signal(signal.SIGKILL)
    try:
        code = p0.wait(timeout=HEARTBEAT_S + EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("process 0 hung after process 1 was killed")
    assert code != 0
    # Which report comes first depends on where process 0 was: JAX's coordination service
    # (missed heartbeats), a collective that failed with an exception (our `error:` line), or
    # a crash inside the collective library (faulthandler's report).
    err = group.stderr(0)
    reports = ("tasks are unhealthy", "another task died", "error:", "Fatal Python error")
    assert any(r in err for r in reports), (code, err[-3000:])


def test_sigterm_to_one_process_stops_all_at_the_same_step(corpus, group, tmp_path):
    """A scheduler's SIGTERM may reach one process first: all must stop after the same step
    and save it together (a save started by one process alone would deadlock)."""
    workdir = tmp_path / "run"
    _, p1 = start_endless_run(group, workdir, corpus)
    p1.send_signal(signal.SIGTERM)
    try:
        codes = group.wait_all(EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("a process hung after SIGTERM: " + group.stderr(0)[-2000:])
    assert codes == [0, 0], [group.stderr(i)[-2000:] for i in range(2)]
    from ringformer.train.checkpoint import Checkpointer

    with Checkpointer(workdir, keep=3) as ck:
        stopped = ck.latest_valid_step()
        assert ck.all_steps() == [stopped] and 1 <= stopped < 1000
        assert ck.read_json(stopped)[0]["batches"] == stopped
    assert max(r["step"] for r in rows(workdir)) == stopped
    assert f"stopped at step {stopped}" in group.stderr(0)
