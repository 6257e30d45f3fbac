"""Hugging Face interop against transformers' own LlamaForCausalLM (torch CPU oracle).

Relative error is max|ours - theirs| / max|theirs| over all logits: elementwise relative
error is meaningless for logits near zero.
"""

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from _llama_oracle import VARIANTS, VOCAB, build, hf_logits, rel_err

from ringformer import model
from ringformer.errors import CheckpointError, ConfigError
from ringformer.hf import mapping as hf

RUN = dict(dtype="float32", attention=model.AttentionConfig(impl="blockwise", q_chunk=16, kv_chunk=16),
           mlp_chunk=16)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, VOCAB, (2, 64))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (hf_dir, torch model); built once for the whole module."""
    out = {}
    for v in VARIANTS:
        d = str(tmp_path_factory.mktemp(v))
        out[v] = (d, build(v, d))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, tokens, variant):
    hf_dir, ref_model = checkpoints[variant]
    cfg, params = hf.load_llama(hf_dir, **RUN)
    heads, kv, theta, tied, _ = VARIANTS[variant]
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (
        heads, kv, theta, tied)
    assert ("lm_head" in params) == (not tied)
    err = rel_err(model.logits(cfg, params, tokens), hf_logits(ref_model, tokens))
    assert err < 1e-4, err


def test_config_reads_rope_scaling(checkpoints):
    cfg, _ = hf.load_llama(checkpoints["gqa_llama3"][0])
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 1.0,
                                                                            4.0, 32)
    cfg, _ = hf.load_llama(checkpoints["gqa_tied_linear"][0])
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("linear", 2.0)


def test_scaling_is_exercised(checkpoints, tokens):
    """Dropping llama3 scaling changes the logits, so the parity test above can fail."""
    hf_dir, ref_model = checkpoints["gqa_llama3"]
    cfg, params = hf.load_llama(hf_dir, **RUN)
    wrong = dataclasses.replace(cfg, rope_scaling="none")
    assert rel_err(model.logits(wrong, params, tokens), hf_logits(ref_model, tokens)) > 1e-3


def test_packed_positions_match_transformers(checkpoints, tokens):
    """Explicit positions (a second document restarting at 0) reach RoPE like HF's position_ids."""
    hf_dir, ref_model = checkpoints["mha"]
    cfg, params = hf.load_llama(hf_dir, **RUN)
    pos = np.concatenate([np.arange(40), np.arange(24)])[None].repeat(2, 0)
    seg = np.concatenate([np.zeros(40), np.ones(24)])[None].repeat(2, 0)
    out = model.logits(cfg, params, tokens, positions=pos, segment_ids=seg)
    # HF on each document alone is the independent reference for packed attention.
    ref = np.concatenate([hf_logits(ref_model, tokens[:, :40]),
                          hf_logits(ref_model, tokens[:, 40:])], axis=1)
    assert rel_err(out, ref) < 1e-4


def test_sharded_safetensors_with_index(checkpoints, tmp_path):
    _, ref_model = checkpoints["gqa_llama3"]
    ref_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / hf.INDEX)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _, sharded = hf.load_llama(str(tmp_path))
    _, single = hf.load_llama(checkpoints["gqa_llama3"][0])
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_bf16_checkpoint_loads_without_torch_dtypes(checkpoints, tmp_path):
    import torch

    bf16 = copy.deepcopy(checkpoints["mha"][1]).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    _, params = hf.load_llama(str(tmp_path))
    assert params["embed"].dtype == np.float32
    want = bf16.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["embed"], want)


@pytest.mark.parametrize("variant", ["gqa_llama3", "gqa_tied_linear"])
def test_export_round_trip_reloads_in_transformers(checkpoints, tokens, tmp_path, variant):
    from transformers import LlamaForCausalLM

    hf_dir, ref_model = checkpoints[variant]
    cfg, params = hf.load_llama(hf_dir, **RUN)
    # Export what a training run holds: device arrays, not host numpy.
    hf.save_llama(cfg, jax.device_put(params), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert rel_err(hf_logits(reloaded, tokens), hf_logits(ref_model, tokens)) < 1e-6
    cfg2, params2 = hf.load_llama(str(tmp_path), **RUN)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_random_init_exports_and_matches(tmp_path, tokens):
    """Our own freshly initialised model, exported: transformers computes our logits."""
    from transformers import LlamaForCausalLM

    cfg = model.ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=96, rope_theta=50000.0, **RUN)
    params = model.init_params(cfg, jax.random.key(0))
    hf.save_llama(cfg, params, str(tmp_path))
    theirs = hf_logits(LlamaForCausalLM.from_pretrained(str(tmp_path)).eval(), tokens)
    assert rel_err(model.logits(cfg, params, tokens), theirs) < 1e-4


@pytest.mark.parametrize("changes", [dict(smear_keys=True), dict(logn_base=64)],
                         ids=["smear_keys", "logn_base"])
def test_models_transformers_cannot_compute_are_refused_before_anything_is_written(tmp_path,
                                                                                  changes):
    """transformers' LLaMA has neither smeared keys nor log-n queries: an export would
    compute another model."""
    cfg = model.ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=96, **changes, **RUN)
    params = model.init_params(cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match=next(iter(changes))):
        hf.save_llama(cfg, params, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _write_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_errors_are_user_errors(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        hf.load_llama(str(tmp_path / "nowhere"))
    _, ref_model = checkpoints["mha"]
    ref_model.save_pretrained(tmp_path)
    _write_config(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                             "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="yarn"):
        hf.load_llama(str(tmp_path))
    _write_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                  num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"layers\.2"):
        hf.load_llama(str(tmp_path))
    _write_config(tmp_path, num_hidden_layers=2, intermediate_size=128)
    with pytest.raises(CheckpointError, match="shape"):
        hf.load_llama(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        hf.load_llama(str(tmp_path))


def _convert(*args):
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([sys.executable, os.path.join(root, "scripts", "convert_hf.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_convert_script_import_then_export(checkpoints, tokens, tmp_path):
    """HF dir -> ringformer checkpoint (step 0) -> HF dir: transformers computes the same."""
    from transformers import LlamaForCausalLM

    hf_dir, ref_model = checkpoints["gqa_llama3"]
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    done = _convert("import", hf_dir, "--workdir", run)
    assert done.returncode == 0, done.stderr
    # How to fine-tune it: the model's shape is read from the run, nothing to retype.
    assert f"--config configs/finetune.py:{run} --workdir {run}" in done.stdout
    again = _convert("import", hf_dir, "--workdir", run)
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    done = _convert("export", "--workdir", run, "--out", out)
    assert done.returncode == 0, done.stderr
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert rel_err(hf_logits(reloaded, tokens), hf_logits(ref_model, tokens)) < 1e-6


def _one_error_line(done, *expected):
    """Exit 2, one `error:` line last on stderr, no traceback; returns that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, done.stderr
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def _files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged_copy(src, dst, content):
    dst.mkdir(parents=True)
    (dst / "config.json").write_bytes((Path(src) / "config.json").read_bytes())
    (dst / hf.SINGLE).write_bytes(content)
    return dst


def test_damaged_safetensors_is_a_checkpoint_error(checkpoints, tmp_path):
    src, ref_model = checkpoints["mha"]
    data = (Path(src) / hf.SINGLE).read_bytes()
    for name, content in {"head": data[:1000], "half": data[:len(data) // 2],
                          "noise": np.random.default_rng(0).bytes(1000)}.items():
        bad = _damaged_copy(src, tmp_path / name, content)
        with pytest.raises(CheckpointError, match=re.escape(str(bad / hf.SINGLE))) as e:
            hf.load_llama(str(bad))
        assert "\n" not in str(e.value) and "again" in e.value.fix
    sharded = tmp_path / "sharded"
    ref_model.save_pretrained(sharded, max_shard_size="40KB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        hf.load_llama(str(sharded))
    (sharded / hf.INDEX).write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=re.escape(hf.INDEX)):
        hf.load_llama(str(sharded))


def test_convert_import_of_bad_input_leaves_no_workdir(checkpoints, tmp_path):
    src = checkpoints["mha"][0]
    bad = _damaged_copy(src, tmp_path / "bad", (Path(src) / hf.SINGLE).read_bytes()[:1000])
    run = tmp_path / "runs" / "new"
    _one_error_line(_convert("import", str(bad), "--workdir", str(run)),
                    str(bad / hf.SINGLE))
    assert not (tmp_path / "runs").exists()
    # A config the fine-tuning run could not use is refused before the workdir is made.
    smoke = os.path.join(str(Path(__file__).resolve().parents[2]),
                         "configs", "smoke.py")
    _one_error_line(_convert("import", src, "--workdir", str(run), "--config", smoke,
                             "--config.train.keep_checkpoints=0"), "train.keep_checkpoints=0")
    assert not (tmp_path / "runs").exists()


def test_convert_export_refuses_bad_paths_and_changes_nothing(checkpoints, tmp_path):
    run = tmp_path / "run"
    assert _convert("import", checkpoints["mha"][0], "--workdir", str(run)).returncode == 0
    before = _files(tmp_path)
    # Into the run itself: its own config.json would be replaced by a HF one.
    _one_error_line(_convert("export", "--workdir", str(run), "--out", str(run)),
                    "already holds files", "choose a new --out or empty it")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    before[a_file] = b"keep me"
    _one_error_line(_convert("export", "--workdir", str(run), "--out", str(a_file)),
                    "is a file")
    _one_error_line(_convert("export", "--workdir", str(a_file), "--out", str(tmp_path / "o")),
                    "is not a directory")
    _one_error_line(_convert("export", "--workdir", str(tmp_path / "gone" / "run"), "--out",
                             str(tmp_path / "o")), "does not exist")
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "run"]


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("hidden_size", -64),
    ("num_hidden_layers", 0), ("intermediate_size", 0), ("vocab_size", 2**40),
    ("rope_theta", 0), ("rope_theta", float("inf")), ("rms_norm_eps", float("nan")),
    ("head_dim", 0), ("vocab_size", True), ("rope_theta", "10000"),
])
def test_degenerate_hf_configs_are_refused_by_every_reader(tmp_path, field, value):
    """read_config is what eval, generate, convert_hf and train.init_from read an HF directory
    with: a degenerate number (zero heads divided by zero, theta 0 gave NaN) is one
    ConfigError naming the field, before any weight is read."""
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
           "vocab_size": 300, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, field: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=re.escape(f"config.json {field}={value!r} is not a "
                                                    "positive finite number")):
        hf.read_config(str(tmp_path))
