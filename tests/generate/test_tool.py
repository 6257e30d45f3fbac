"""scripts/generate.py and the tool behind it: prompts, output, and every bad input as one
`error:` line."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ringformer import model
from ringformer.errors import UserError
from ringformer.generate import Generator, Sampling, tool
from ringformer.generate.api import check_positions
from ringformer.hf import mapping as hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random byte-vocabulary LLaMA saved as a Hugging Face directory (128 positions)."""
    cfg = model.ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=64, max_position=128)
    d = tmp_path_factory.mktemp("hf")
    hf.save_llama(cfg, model.init_params(cfg, jax.random.key(0)), str(d))
    return str(d)


def _run(hf_dir, prompts, **kw):
    out = io.StringIO()
    kw = {"max_new_tokens": 6, **kw}  # default mesh: all 8 devices on sp
    rows = tool.run(prompts=prompts, hf_dir=hf_dir, tokenizer="byte", out=out, **kw)
    return rows, out.getvalue()


def test_json_lines_and_greedy_text(hf_dir):
    rows, text = _run(hf_dir, ["def main(", "x"], json_lines=True)
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == rows and [r["prompt"] for r in rows] == ["def main(", "x"]
    assert set(rows[0]) == {"prompt", "text", "tokens", "prefill_tokens_per_sec",
                            "decode_tokens_per_sec"}
    cfg, params = hf.load_llama(hf_dir, dtype="float32")
    want = Generator(cfg, params).generate([[b + 3 for b in b"def main("]], max_new_tokens=6)
    assert rows[0]["tokens"] == want.tokens[0].tolist()  # byte tokenizer: no BOS, no EOS hit


def test_single_prompt_streams_and_stops_at_a_stop_string(hf_dir):
    rows, _ = _run(hf_dir, ["abc"], sampling=Sampling(temperature=1.0, seed=2))
    full = rows[0]["text"]
    stop = full[2:4]
    rows, text = _run(hf_dir, ["abc"], sampling=Sampling(temperature=1.0, seed=2), stop=[stop])
    assert rows[0]["text"] == full[:full.find(stop)]
    assert text.startswith("abc" + rows[0]["text"]) and "tokens; prefill" in text


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\nprompt\n")
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert tool.read_prompts(None, str(tmp_path / "p.txt")) == ["one\nprompt\n"]
    assert tool.read_prompts(None, str(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"txt": "a"}\n')
    with pytest.raises(UserError, match="line 1"):
        tool.read_prompts(None, str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("prompts,kw,match", [
    (["  "], {}, "prompt 1 is empty"),
    (["a"], {"max_new_tokens": 0}, "max_new_tokens 0 must be at least 1"),
    (["a" * 100], {"max_new_tokens": 40}, "past the 128 positions.*allow_longer_context"),
    (["a", "b", "c"], {"mesh_sizes": {"dp": 1, "fsdp": 2, "sp": 4, "tp": 1}}, "dp\\*fsdp=2"),
    (["a"], {"mesh_sizes": {"dp": 1, "fsdp": 1, "sp": 2, "tp": 4}}, "tp=4 does not divide"),
])
def test_bad_input_is_one_error(hf_dir, prompts, kw, match):
    with pytest.raises(UserError, match=match):
        _run(hf_dir, prompts, **kw)


def test_longer_context_when_allowed(hf_dir):
    cfg = hf.read_config(hf_dir)
    check_positions(cfg, 100, 28)
    check_positions(cfg, 100, 40, allow_longer=True)
    with pytest.raises(UserError, match="reaches position 129"):
        check_positions(cfg, 100, 29)


def _script(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_script_end_to_end(hf_dir):
    r = _script("--hf", hf_dir, "--tokenizer", "byte", "--prompt", "hi", "--prompt", "yo",
                "--max_new_tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["prompt"] for line in r.stdout.splitlines()] == ["hi", "yo"]


def test_script_errors(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    for args, match in (
            (["--hf", str(tmp_path), "--prompt", "a"], "not a LLaMA"),
            (["--hf", hf_dir, "--prompt", "a", "--max_new_tokens", "-1"], "at least 1"),
            (["--hf", hf_dir, "--prompt", ""], "is empty")):
        r = _script("--tokenizer", "byte", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
