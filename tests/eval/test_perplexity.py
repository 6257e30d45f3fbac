"""Long-document evaluation against independent references.

- Perplexity from `scripts/eval.py --hf` equals what transformers (torch CPU) computes on the
  same windows, with windows and NLL written out again here, not taken from ringformer.
- The same parameters give the same perplexity on one device and on a ring of 4.
- Windows cover every target exactly once (pure-python property test).
- The passkey scorer scores planted right answers right and wrong ones wrong (fake models),
  and the JAX answer scorer matches full logits.
- Bad inputs end with one `error:` line and exit status 2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import _llama_oracle as oracle
import jax
import numpy as np
import pytest

from ringformer import model
from ringformer.data.tokenizer import load_tokenizer
from ringformer.eval import passkey as passkey_eval
from ringformer.eval import perplexity as evaluate
from ringformer.eval import tool
from ringformer.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[2]
BYTE = load_tokenizer("byte")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "ring",
         "attention", "passes", "key", "value", "blocks", "around", "the", "devices"]
CONTEXT, STRIDE = 256, 96  # the oracle model supports 256 positions


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def _byte_ids(text: str) -> np.ndarray:
    """The byte tokenizer's document ids, written out independently: bytes + 3, then EOS=1."""
    return np.array([b + 3 for b in text.encode("utf-8")] + [1], np.int64)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(hf_dir, torch model): the oracle's random LLaMA with the byte tokenizer's 259 ids and
    weights scaled up, so predictions depend clearly on the context (a near-uniform model
    would hide mistakes)."""
    import torch

    d = str(tmp_path_factory.mktemp("hf"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oracle, "VOCAB", 259)
        m = oracle.build("mha", d)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    m.save_pretrained(d)
    return d, m


@pytest.fixture(scope="module")
def texts():
    return [_text(130, 0), _text(80, 1)]  # about 700 and 450 bytes: several windows each


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _script(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the script gives itself its devices
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "eval.py"), *map(str, args)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def script_run(hf_model, data_file, tmp_path_factory):
    """One run of scripts/eval.py (sliding windows, dp=2 x sp=4 zigzag, passkey)."""
    out = tmp_path_factory.mktemp("out") / "result.json"
    proc = _script("--hf", hf_model[0], "--tokenizer", "byte", "--data", data_file,
                   "--context", CONTEXT, "--stride", STRIDE, "--mesh", "dp=2,fsdp=1,sp=4,tp=1",
                   "--batch", 4, "--out", out, "--passkey", "--passkey_lengths", "230,256",
                   "--passkey_depths", "0,0.5,1", "--passkey_trials", 1,
                   "--passkey_candidates", 4)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return out, json.loads(out.read_text()), stdout


def oracle_nll(torch_model, docs, context: int, stride: int) -> tuple[float, int]:
    """(summed NLL, scored tokens) the way the transformers docs compute sliding perplexity:
    windows start every `stride` inputs, each scores the targets past the previous end."""
    total, count = 0.0, 0
    for doc in docs:
        last = len(doc) - 1
        prev_end = 0
        for begin in range(0, last, stride):
            end = min(begin + context, last)
            logits = oracle.hf_logits(torch_model, doc[None, begin:end],
                                      position_ids=np.arange(begin, end)[None])[0]
            logits = logits.astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - logits.max(-1, keepdims=True)
            for i in range(end - begin):
                if begin + i + 1 > prev_end:
                    total -= logp[i, doc[begin + i + 1]]
                    count += 1
            prev_end = end
            if end == last:
                break
    return total, count


# ----------------------------------------------------------------------------- perplexity


def test_script_perplexity_matches_transformers(script_run, hf_model, texts):
    _, result, stdout = script_run
    total, count = oracle_nll(hf_model[1], [_byte_ids(t) for t in texts], CONTEXT, STRIDE)
    assert result["tokens"] == count == sum(len(t.encode()) for t in texts)
    assert abs(result["loss"] - total / count) < 1e-4, (result["loss"], total / count)
    assert abs(result["ppl"] - np.exp(total / count)) / np.exp(total / count) < 1e-4
    assert result["loss"] > 0.5 and "ppl" in stdout


def test_script_writes_fields_and_plots(script_run):
    out, r, _ = script_run
    for key in ("ppl", "loss", "tokens", "documents", "context", "loss_by_position", "stride",
                "windows", "mesh"):
        assert key in r, key
    assert (r["documents"], r["context"], r["stride"]) == (2, CONTEXT, STRIDE)
    assert r["mesh"] == {"dp": 2, "fsdp": 1, "sp": 4, "tp": 1}
    buckets = r["loss_by_position"]
    assert [(b["start"], b["end"]) for b in buckets[:4]] == [(0, 1), (1, 2), (2, 4), (4, 8)]
    assert buckets[-1]["end"] == CONTEXT
    assert sum(b["tokens"] for b in buckets) == r["tokens"]
    weighted = sum(b["loss"] * b["tokens"] for b in buckets) / r["tokens"]
    assert abs(weighted - r["loss"]) < 1e-6
    pk = r["passkey"]
    assert (pk["lengths"], pk["depths"]) == ([230, 256], [0.0, 0.5, 1.0])
    for field in ("greedy_accuracy", "rank_accuracy"):
        grid = np.asarray(pk[field])
        assert grid.shape == (2, 3) and ((grid >= 0) & (grid <= 1)).all()
    assert len(pk["examples"]) == 6
    assert all(e["prompt_tokens"] < e["length"] for e in pk["examples"])
    for png in (out.with_suffix(".png"), out.with_name("result_passkey.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert r["plot"] == str(out.with_suffix(".png"))


def test_one_device_equals_ring_of_four(hf_model, texts):
    """Non-overlapping windows: sp=1 and sp=4 (zigzag) agree, and both match transformers."""
    from ringformer.hf import mapping as hf

    cfg, params = hf.load_llama(hf_model[0], dtype="float32",
                                attention=model.AttentionConfig(layout="zigzag", q_chunk=16, kv_chunk=16))
    docs = [_byte_ids(t).astype(np.int32) for t in texts]
    context = 100  # not a multiple of the ring: windows get padded
    results = []
    for sp in (1, 4):
        mesh = make_mesh({"dp": 1, "fsdp": 1, "sp": sp, "tp": 1}, jax.devices()[:sp])
        ev = evaluate.Evaluator(cfg, params, context=context, mesh=mesh, batch_size=2)
        assert ev.seq_len % (2 * sp) == 0 and ev.seq_len >= context
        results.append(evaluate.evaluate_documents(ev, docs))
    one, ring = results
    assert one["tokens"] == ring["tokens"] == sum(len(d) - 1 for d in docs)
    assert abs(one["loss"] - ring["loss"]) < 1e-4
    total, count = oracle_nll(hf_model[1], [d.astype(np.int64) for d in docs], context, context)
    assert abs(one["loss"] - total / count) < 1e-4


def test_token_nll_sums_to_the_trainers_loss():
    """The evaluator's per-position NLL adds up to model.loss_fn on a packed batch."""
    cfg = model.ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, dtype="float32", mlp_chunk=8, loss_chunk=8,
                            attention=model.AttentionConfig(impl="blockwise", q_chunk=8, kv_chunk=8))
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    seg = np.repeat([[1] * 10 + [2] * 14 + [0] * 8], 2, 0)
    batch = {"tokens": rng.integers(0, 50, (2, 32)), "targets": rng.integers(0, 50, (2, 32)),
             "segment_ids": seg, "positions": np.tile(np.r_[0:10, 0:14, 0:8], (2, 1)),
             "loss_mask": (seg > 0).astype(np.float32)}
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    per = jax.jit(lambda p, b: evaluate.token_nll(cfg, p, b, mesh=None))(params, batch)
    loss_sum, n = jax.jit(lambda p, b: model.loss_fn(cfg, p, b, mesh=None))(params, batch)
    assert abs(float(per.sum()) - float(loss_sum)) < 1e-3 and float(n) == 48
    assert float(np.abs(np.asarray(per)[:, 24:]).max()) == 0.0


def test_run_on_a_training_checkpoint(tmp_path, texts, data_file):
    """--workdir path: the run's tokenizer and layout, restored onto another mesh (sp=8 instead
    of fsdp=2 x sp=4); perplexity matches full logits of the saved parameters per window."""
    import ml_collections

    from configs.smoke import get_config
    from ringformer import optim
    from ringformer.train import checkpoint
    from ringformer.train import state as train_state

    config = get_config()
    config.model.init_std = 0.3  # a model whose predictions depend on the context
    cfg = model.ModelConfig.from_config(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    state = train_state.init_state(cfg, tx, make_mesh(config.mesh), seed=0)
    ck = checkpoint.Checkpointer(tmp_path / "run", keep=1)
    ck.save(0, state, data_state={"seed": 0, "batches": 0},
            config_json=json.loads(ml_collections.ConfigDict(config).to_json_best_effort()))
    ck.wait()
    ck.close()
    params = jax.device_get(state.params)
    dense = cfg.with_attention(impl="dense")  # the reference skips the ring kernel
    out = tmp_path / "eval" / "r.json"
    r = tool.run(data=str(data_file), context=64, out=str(out), workdir=str(tmp_path / "run"),
                     mesh_sizes={"dp": 1, "fsdp": 1, "sp": 8, "tp": 1}, progress=False)
    assert r["model"].endswith("step 0") and r["tokenizer"] == "byte"
    assert json.loads(out.read_text())["ppl"] == r["ppl"] and out.with_suffix(".png").exists()
    total, count = 0.0, 0
    for text in texts:
        doc = _byte_ids(text)
        for begin in range(0, len(doc) - 1, 64):
            end = min(begin + 64, len(doc) - 1)
            lg = np.asarray(model.logits(dense, params, doc[None, begin:end],
                                         positions=np.arange(begin, end)[None]))[0]
            lg = lg.astype(np.float64)
            lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
            total += float((lse - lg[np.arange(end - begin), doc[begin + 1:end + 1]]).sum())
            count += end - begin
    assert r["tokens"] == count and abs(r["loss"] - total / count) < 1e-4


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_every_target_once(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(0, 300, rng.integers(1, 6))]
    context = int(rng.integers(1, 80))
    for stride in (None, int(rng.integers(1, context + 1)), context):
        windows = evaluate.plan_windows(lengths, context, stride)
        covered = evaluate.covered_targets(windows)
        expected = [(d, t) for d, n in enumerate(lengths) for t in range(1, n)]
        assert sorted(covered) == expected  # every target (not a document's first), once
        for w in windows:
            assert 1 <= w.length <= context and w.start + w.length <= lengths[w.doc] - 1
            if stride is not None and w.start > 0:  # sliding: scored tokens keep their context
                assert w.score_from >= context - stride or w.start + w.length == lengths[w.doc] - 1
        # Host rows hold each window's own slice, targets shifted by one, true positions.
        docs = [np.arange(n, dtype=np.int32) + 1000 * d for d, n in enumerate(lengths)]
        for host, group in evaluate.window_batches(docs, windows, context + 3, 4):
            for r, w in enumerate(group):
                n = w.length
                assert (host["tokens"][r, :n] - 1000 * w.doc == host["positions"][r, :n]).all()
                assert (host["positions"][r, :n] == np.arange(w.start, w.start + n)).all()
                assert (host["targets"][r, :n] == host["tokens"][r, :n] + 1).all()
                assert host["loss_mask"][r].sum() == n - w.score_from
            assert host["loss_mask"][len(group):].sum() == 0


def test_sliding_windows_score_with_longer_context():
    w = evaluate.plan_windows([11], context=4, stride=2)
    assert [(x.start, x.length, x.score_from) for x in w] == [(0, 4, 0), (2, 4, 2), (4, 4, 2),
                                                            (6, 4, 2)]
    w = evaluate.plan_windows([11], context=4)
    assert [(x.start, x.length, x.score_from) for x in w] == [(0, 4, 0), (4, 4, 0), (8, 2, 0)]
    with pytest.raises(ValueError):
        evaluate.plan_windows([10], context=4, stride=5)


# ----------------------------------------------------------------------------- passkey


def _fake_model(believe):
    """A scorer that is certain the key is `believe(prompt text)`; -10 for any other token."""
    def scorer(rows):
        out = []
        for ids, start in rows:
            prompt = BYTE.decode(ids[:start])
            want = np.array([b + 3 for b in f" {believe(prompt)}".encode()])
            got = ids[start:]
            k = min(len(want), len(got))
            logp = np.where(got[:k] == want[:k], 0.0, -10.0)
            out.append((logp, want[:len(got)]))
        return out
    return scorer


def _needle(prompt: str) -> str:
    return prompt.split("The pass key is ")[1].split(".")[0]


def test_passkey_scorer_right_and_wrong():
    lengths, depths = [300, 600], [0.0, 0.5, 1.0]
    kw = dict(trials=2, n_candidates=5, seed=3)
    right = passkey_eval.run_passkey(_fake_model(_needle), BYTE, lengths, depths, **kw)
    assert right["greedy_mean"] == right["rank_mean"] == 1.0
    assert all(e["predicted"] == f" {e['key']}" for e in right["examples"])
    # Every digit shifted: greedy decoding is wrong, and the true key never ranks first.
    shifted = lambda p: "".join(str((int(c) + 1) % 10) for c in _needle(p))
    wrong = passkey_eval.run_passkey(_fake_model(shifted), BYTE, lengths, depths, **kw)
    assert wrong["greedy_mean"] == wrong["rank_mean"] == 0.0
    # A model that knows one key only: right exactly where that key was planted.
    tasks = passkey_eval.make_tasks(BYTE, [300], [0.5], trials=3, n_candidates=4, seed=1)
    planted = tasks[1].example.key
    res = passkey_eval.score_tasks(tasks, _fake_model(lambda p: planted), BYTE)
    assert [r["greedy"] for r in res] == [False, True, False]
    assert [r["rank_first"] for r in res] == [False, True, False]
    assert np.asarray(right["greedy_accuracy"]).shape == (2, 3)
    # Prompts hold the key where asked, and prompt + answer fit the requested length.
    tasks = passkey_eval.make_tasks(BYTE, [300, 2000], depths, n_candidates=3)
    for t in tasks:
        assert all(len(ids) <= t.length for ids, _ in t.rows)
        assert t.example.text.count(f"pass key is {t.example.key}.") == 1
        if t.length == 2000:
            assert abs(t.example.actual_depth - t.example.depth) < 0.1


def test_answer_scores_match_full_logits():
    """The evaluator's teacher-forced answer log-probs (ring of 4, zigzag) match full logits."""
    cfg = model.ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, dtype="float32", init_std=0.2,
                            attention=model.AttentionConfig(layout="zigzag"))
    params = jax.device_get(model.init_params(cfg, jax.random.PRNGKey(1)))
    mesh = make_mesh({"dp": 2, "fsdp": 1, "sp": 4, "tp": 1})
    ev = evaluate.Evaluator(cfg, params, context=64, mesh=mesh)
    rng = np.random.default_rng(0)
    # Two lengths: rows are padded to different power-of-two buckets (64 and 16).
    rows = [(rng.integers(3, 259, n).astype(np.int32), s) for n, s in ((64, 58), (9, 2))]
    scores = ev.answer_scores(rows)
    for (ids, start), (logp, best) in zip(rows, scores, strict=True):
        full = np.asarray(model.logits(cfg, params, ids[None]))[0].astype(np.float64)
        ref = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - full.max(-1, keepdims=True)
        j = np.arange(start, len(ids))
        np.testing.assert_allclose(logp, ref[j - 1, ids[j]], atol=1e-4)
        assert (best == ref[j - 1].argmax(-1)).all()


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_fail_cleanly(hf_model, data_file, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{not json\n')
    common = ["--context", 64, "--out", tmp_path / "r.json"]
    cases = {
        "missing_workdir": ["--workdir", tmp_path / "nope", "--data", data_file, *common],
        "no_checkpoint": ["--workdir", empty, "--data", data_file, *common],
        "missing_hf": ["--hf", tmp_path / "nohf", "--data", data_file, *common],
        "too_long": ["--hf", hf_model[0], "--tokenizer", "byte", "--data", data_file,
                     "--context", 512, "--out", tmp_path / "r.json"],
        "missing_data": ["--hf", hf_model[0], "--tokenizer", "byte", "--data",
                         tmp_path / "none.jsonl", *common],
        "unreadable_data": ["--hf", hf_model[0], "--tokenizer", "byte", "--data", bad_json,
                            *common],
        "bad_mesh": ["--hf", hf_model[0], "--data", data_file, "--mesh", "sp=two", *common],
    }
    procs = {name: _script(*args) for name, args in cases.items()}  # run side by side
    expect = {"missing_workdir": "does not exist", "no_checkpoint": "no checkpoints",
              "missing_hf": "config.json", "too_long": "--allow_longer_context",
              "missing_data": "does not exist", "unreadable_data": "invalid JSON",
              "bad_mesh": "--mesh"}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2, (name, err[-2000:])
        assert len(lines) == 1 and "Traceback" not in err, (name, err[-2000:])
        assert expect[name] in lines[0], (name, lines[0])
    assert not (tmp_path / "nope").exists() and not any(empty.iterdir())
    assert not (tmp_path / "r.json").exists()


def test_run_refuses_before_loading_anything(tmp_path, data_file):
    """Bad options and paths end `run` before a model is loaded: a missing workdir would be
    reported otherwise. Data errors name --data, not the trainer's config keys."""
    from ringformer.errors import CheckpointError, ConfigError, DataError

    (tmp_path / "dir").mkdir()
    kw = dict(data=[str(data_file)], context=64, out=str(tmp_path / "r.json"),
              workdir=str(tmp_path / "nope"), progress=False)
    with pytest.raises(ConfigError, match="is a directory"):
        tool.run(**{**kw, "out": str(tmp_path / "dir")})
    with pytest.raises(ConfigError, match="--passkey_trials 0"):
        tool.run(**kw, passkey=True, passkey_trials=0)
    with pytest.raises(DataError) as e:
        tool.run(**{**kw, "data": [str(tmp_path / "none.jsonl")]})
    assert "does not exist" in e.value.what and "--data" in e.value.fix
    assert "data.train_files" not in str(e.value)
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(CheckpointError, match=r"workdir .*a_file is not a directory"):
        tool.run(**{**kw, "workdir": str(tmp_path / "a_file")})
    assert (tmp_path / "a_file").read_text() == "kept" and not (tmp_path / "r.json").exists()


def test_script_checks_flags_before_loading(tmp_path, data_file):
    """scripts/eval.py: `--context 0` is checked (not taken for a missing flag), and options
    are refused before the workdir (missing here) is looked at."""
    (tmp_path / "dir").mkdir()
    base = ["--workdir", tmp_path / "nope", "--data", data_file]
    cases = {
        "context_zero": ([*base, "--context", 0, "--out", tmp_path / "r.json"],
                         "error: --context 0 must be positive"),
        "out_is_a_directory": ([*base, "--context", 64, "--out", tmp_path / "dir"],
                               f"error: --out {tmp_path / 'dir'} is a directory"),
        "passkey_depth": ([*base, "--context", 512, "--out", tmp_path / "r.json", "--passkey",
                           "--passkey_lengths", 300, "--passkey_depths", 2],
                          "error: --passkey_depths 2.0 is outside [0, 1]"),
    }
    procs = {name: _script(*args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-2000:])
        assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err, (name, err)
        assert err.startswith(cases[name][1]), (name, err)
    assert not (tmp_path / "r.json").exists() and not any((tmp_path / "dir").iterdir())
