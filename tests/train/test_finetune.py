"""configs/finetune.py: an imported or Hugging Face model is fine-tuned without retyping its shape."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]
# What this CPU needs, not the model: nothing under --config.model.* but the dtype.
CPU = ("--config.data.seq_len=128", "--config.train.steps=1", "--config.model.dtype=float32",
       "--config.optim.lr=1e-12", "--config.optim.warmup_steps=0")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=5e4)).save_pretrained(d)
    return d


def train(source, workdir, data, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                           f"{ROOT / 'configs' / 'finetune.py'}:{source}", "--workdir",
                           str(workdir), f"--config.data.train_files={data}", *CPU, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def params_of(workdir):
    import jax

    from ringformer.train.state import restore_run
    config, state = restore_run(workdir)
    return config, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_an_import_fine_tunes_with_no_model_flags(hf_dir, tmp_path):
    from ringformer.hf.mapping import load_llama

    data = write_corpus(tmp_path / "train.jsonl", 20, 0)
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf.py"), "import",
                           str(hf_dir), "--workdir", str(run)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--config configs/finetune.py:{run} --workdir {run}" in done.stdout
    assert "--config.model." not in done.stdout
    # An override that contradicts the imported model is refused, and the import is kept.
    bad = train(run, run, data, "--config.model.n_layers=3")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model.n_layers: checkpoint 2 vs config 3" in bad.stderr
    proc = train(run, run, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config, params = params_of(run)
    assert config.model.rope_theta == 5e4 and config.model.max_position == 256
    for got, want in zip(params, __import__("jax").tree.leaves(load_llama(str(hf_dir))[1]),
                         strict=True):
        np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=1e-6)


def test_a_hugging_face_directory_fine_tunes_with_no_model_flags(hf_dir, tmp_path):
    data = write_corpus(tmp_path / "train.jsonl", 20, 0)
    proc = train(hf_dir, tmp_path / "run", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(hf_dir)
    assert {k: saved["model"][k] for k in ("dim", "n_layers", "n_kv_heads", "ffn_dim")} == \
        {"dim": 32, "n_layers": 2, "n_kv_heads": 1, "ffn_dim": 64}
    bad = train(hf_dir, tmp_path / "other", data, "--config.model.ffn_dim=128")
    assert bad.returncode == 2 and "holds parameters of another shape" in bad.stderr, bad.stderr
    assert not (tmp_path / "other").exists()
