"""The long-context recipe (`make longctx`, docs/long_context.md) end to end at toy sizes.

Data as `scripts/prepare_data.py --retrieval_examples` writes it, stage 1 from
configs/longctx_stage1.py, stage 2 from configs/longctx_stage2.py (init_from stage 1, theta
raised, twice the context), the evaluation of both (perplexity with loss by position, passkey
by greedy generation from the held-out prompts) and the side-by-side report: the same configs
and code paths as the real recipe, with only the sizes overridden, so the recipe cannot rot.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, mlp_chunk=32,
                 loss_chunk=32)


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _toy(config, data: Path, seq_len: int, sources: str):
    config.train.steps = 2
    config.train.log_every = config.train.eval_every = config.train.save_every = 2
    config.data.seq_len = seq_len
    config.data.sources = sources
    config.data.eval_files = ""  # evaluated below by the eval tool, as the recipe does
    config.data.cache_dir = str(data / "cache")
    config.model.update(TOY_MODEL)
    config.attention.q_chunk = config.attention.kv_chunk = 32
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ringformer.data.corpus import build_stdlib_corpus
    from ringformer.data.retrieval import build_retrieval_files, write_long_documents

    d = tmp_path_factory.mktemp("data")
    build_stdlib_corpus(d / "stdlib", limit=40)
    build_retrieval_files(d / "longctx", examples=24, long_examples=4, min_tokens=256,
                          max_tokens=300, long_max_tokens=512, heldout_lengths=[512],
                          heldout_depths=[0.0, 1.0], heldout_per_length=2, seed=0)
    assert write_long_documents(d / "stdlib" / "eval.jsonl", d / "longctx" / "heldout_long.jsonl",
                                512) >= 2  # one per fsdp shard
    return d


def test_retrieval_data_is_seeded_supervised_and_held_out(data, tmp_path):
    from ringformer.data.retrieval import build_retrieval_files, is_heldout_key

    again = tmp_path / "again"
    build_retrieval_files(again, examples=24, long_examples=4, min_tokens=256, max_tokens=300,
                          long_max_tokens=512, heldout_lengths=[512],
                          heldout_depths=[0.0, 1.0], heldout_per_length=2, seed=0)
    for name in ("train_short", "train_long", "heldout_passkey"):
        assert (again / f"{name}.jsonl").read_bytes() == \
            (data / "longctx" / f"{name}.jsonl").read_bytes()
    train = [json.loads(x) for x in (again / "train_short.jsonl").read_text().splitlines()]
    assert {r["task"] for r in train} == {"passkey", "kv", "copy"}
    assert all(256 * 0.8 <= r["length"] <= 300 for r in train)
    trained_keys = {r["key"] for r in train if r["task"] == "passkey"}
    held = [json.loads(x) for x in (again / "heldout_passkey.jsonl").read_text().splitlines()]
    assert len(held) == 2 and all(is_heldout_key(r["key"]) for r in held)
    assert not trained_keys & {r["key"] for r in held}
    assert all("The grass is green." not in r["prompt"] for r in train)
    assert all("The grass is green." in r["prompt"] for r in held)


def test_greedy_generation_scores_exact_keys():
    from ringformer.data.tokenizer import ByteTokenizer
    from ringformer.eval import passkey_gen

    tok = ByteTokenizer()
    prompts = passkey_gen.make_prompts(tok, [300, 400], [0.0, 1.0], trials=2)

    def oracle(batch, new):  # answers right on 300-token prompts, one digit off on the others
        out = []
        for ids in batch:
            p = next(p for p in prompts if tok.encode(p["prompt"]) == list(ids))
            key = p["key"] if p["length"] == 300 else str(int(p["key"]) + 1)
            out.append(tok.encode(f" {key}.")[:new])
        return out

    r = passkey_gen.run_generate(oracle, tok, prompts)
    assert r["greedy_by_length"] == [1.0, 0.0] and r["greedy_mean"] == 0.5
    assert r["prompts_by_length"] == [4, 4]
    assert passkey_gen.generated_key(" 12345. The") == "12345"


def test_recipe_end_to_end(data, tmp_path):
    """Stage 1 -> stage 2 (init_from, theta up, longer rows) -> eval of both -> report."""
    from ringformer.eval.report import compare
    from ringformer.eval.tool import run
    from ringformer.train.loop import train_and_evaluate

    short, long = data / "longctx" / "train_short.jsonl", data / "longctx" / "train_long.jsonl"
    stdlib = data / "stdlib" / "train.jsonl"
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    c1 = _toy(_config("longctx_stage1"), data, 256, f"{stdlib}:0.04,{short}:0.96")
    train_and_evaluate(c1, s1)
    c2 = _toy(_config("longctx_stage2"), data, 512, f"{stdlib}:0.04:512:4,{short}:0.5,{long}:0.5")
    assert c2.model.rope_theta > c1.model.rope_theta and c2.mesh.sp >= 4
    c2.train.init_from = str(s1)
    train_and_evaluate(c2, s2)
    rows = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()

    evals = {}
    for name, workdir in (("stage 1", s1), ("stage 2", s2)):
        out = tmp_path / f"eval_{name[-1]}.json"
        r = run(data=str(data / "longctx" / "heldout_long.jsonl"), context=512, out=str(out),
                workdir=str(workdir), passkey_file=str(data / "longctx" / "heldout_passkey.jsonl"),
                progress=False)
        assert r["passkey"]["lengths"] == [512] and r["passkey"]["prompts_by_length"] == [2]
        assert r["loss_by_position"][-1]["end"] == 512
        evals[name] = out
    made = compare(evals, tmp_path / "images")
    assert Path(made["passkey_plot"]).stat().st_size > 0
    assert Path(made["loss_plot"]).stat().st_size > 0
    assert made["markdown"].count("| stage") == 2
