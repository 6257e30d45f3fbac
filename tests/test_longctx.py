"""The long-context recipe (`make longctx`, docs/long_context.md) end to end at toy sizes.

Data as `scripts/prepare_data.py --retrieval_examples` writes it (a 300-token BPE trained
here, as the recipe trains its 2048-token one), the warm-up from configs/longctx_warmup.py,
the rung from configs/longctx_rung.py (init_from the warm-up), stage 1 from
configs/longctx_stage1.py (init_from the rung), stage 2 from
configs/longctx_stage2.py (init_from stage 1, theta raised, twice the context), the
evaluation of both (perplexity with loss by position, passkey by greedy generation from the
held-out prompts) and the side-by-side report: the same configs and code paths as the real
recipe, with only the sizes overridden, so the recipe cannot rot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringformer.config import config_module

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, mlp_chunk=32,
                 loss_chunk=32, vocab_size=300)


def _config(name: str):
    return config_module(ROOT / "configs" / f"{name}.py").get_config()


def _toy(config, data: Path, seq_len: int, sources: str):
    config.train.steps = 2
    config.train.log_every = config.train.eval_every = config.train.save_every = 2
    config.data.seq_len = seq_len
    config.data.sources = sources
    config.data.eval_files = ""  # evaluated below by the eval tool, as the recipe does
    config.data.cache_dir = str(data / "cache")
    config.data.tokenizer = str(data / "longctx" / "tokenizer.json")
    config.model.update(TOY_MODEL)
    config.attention.q_chunk = config.attention.kv_chunk = 32
    return config


RETRIEVAL = dict(examples=24, long_examples=4, min_tokens=256, max_tokens=300,
                 long_max_tokens=512, heldout_lengths=[512], heldout_depths=[0.0, 1.0],
                 heldout_per_length=2, seed=0, warmup_examples=16, warmup_tokens=(64, 128),
                 gap_copy_examples=16, gap_copy_tokens=(32, 128), rung_examples=16,
                 rung_tokens=(64, 256), vocab_size=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ringformer.data.corpus import build_stdlib_corpus
    from ringformer.data.retrieval import build_retrieval_files, write_long_documents
    from ringformer.data.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("data")
    build_stdlib_corpus(d / "stdlib", limit=40)
    build_retrieval_files(d / "longctx", corpus=d / "stdlib" / "train.jsonl", **RETRIEVAL)
    tok = load_tokenizer(str(d / "longctx" / "tokenizer.json"))
    assert write_long_documents(d / "stdlib" / "eval.jsonl", d / "longctx" / "heldout_long.jsonl",
                                512, tokenizer=tok) >= 2  # one per fsdp shard
    return d


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_retrieval_data_is_seeded_supervised_and_held_out(data, tmp_path):
    from ringformer.data.retrieval import build_retrieval_files, is_heldout_key

    # Built again in another process with another string-hash seed: nothing may depend on
    # set or dict order (it once did: key-value names were shuffled from a set).
    again = tmp_path / "again"
    code = ("from ringformer.data.retrieval import build_retrieval_files; "
            f"build_retrieval_files({str(again)!r}, corpus="
            f"{str(data / 'stdlib' / 'train.jsonl')!r}, **{RETRIEVAL!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    done = build_retrieval_files(again, corpus=data / "stdlib" / "train.jsonl", **RETRIEVAL)
    assert done["skipped"]
    for name in ("train_gap_copy.jsonl", "train_rung.jsonl", "train_warmup.jsonl",
                 "train_short.jsonl", "train_long.jsonl", "heldout_passkey.jsonl",
                 "tokenizer.json"):
        assert (again / name).read_bytes() == (data / "longctx" / name).read_bytes()
    train = _read(again / "train_short.jsonl")
    assert {r["task"] for r in train} == {"passkey", "passkey_noise", "kv", "copy"}
    assert {r["task"] for r in _read(again / "train_gap_copy.jsonl")} == {"gap_copy"}
    assert {r["task"] for r in _read(again / "train_rung.jsonl")} == \
        {"gap_copy", "passkey", "passkey_noise", "kv"}
    trained_keys = {r["key"] for r in train if r["task"].startswith("passkey")}
    held = _read(again / "heldout_passkey.jsonl")
    assert len(held) == 2 and all(is_heldout_key(r["key"]) for r in held)
    assert not trained_keys & {r["key"] for r in held}
    assert all("The grass is green." not in r["prompt"] for r in train)
    assert all("The grass is green." in r["prompt"] for r in held)
    # Characters per token were measured per task, so tasks of very different density
    # (random copy text, filler sentences) both land near the lengths asked for.
    assert done["chars_per_token"]["copy"] < done["chars_per_token"]["passkey"]
    # Nonsense filler is split into the BPE's small pieces, as the benchmark's unseen words
    # are: it was kept out of the BPE's sample.
    assert done["chars_per_token"]["passkey_noise"] < done["chars_per_token"]["passkey"]


def test_lengths_count_the_recipe_tokenizer(data):
    """Examples, held-out prompts and held-out documents are sized in BPE tokens, not bytes."""
    from ringformer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(data / "longctx" / "tokenizer.json"))

    def tokens(r):
        return len(tok.encode(r["prompt"] + r["response"])) + 1  # + EOS

    for name, (low, high) in (("train_gap_copy", (32, 128)), ("train_rung", (64, 256)),
                              ("train_warmup", (64, 128)), ("train_short", (256, 300)),
                              ("train_long", (301, 512))):
        n = np.array([tokens(r) for r in _read(data / "longctx" / f"{name}.jsonl")])
        # Measured ratios are averages: a single example may miss its length by a fifth.
        assert low * 0.6 <= np.median(n) <= high * 1.2, (name, n)
        assert n.max() <= high * 1.5, (name, n)
    for r in _read(data / "longctx" / "heldout_passkey.jsonl"):
        room = len(tok.encode(f" {r['key']}")) + 2
        assert r["length"] - room - 40 <= len(tok.encode(r["prompt"])) <= r["length"] - room
    for r in _read(data / "longctx" / "heldout_long.jsonl"):
        assert 510 <= len(tok.encode(r["text"])) <= 512  # whole characters: exact or nearly


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
    """Warm-up -> rung -> stage 1 (init_from each) -> stage 2 (init_from, theta up, longer
    rows) -> eval of both -> report, on the recipe's own BPE, with smeared keys throughout."""
    from ringformer.eval.report import compare
    from ringformer.eval.tool import run
    from ringformer.train.loop import train_and_evaluate

    lc = data / "longctx"
    warm, short, long = lc / "train_warmup.jsonl", lc / "train_short.jsonl", lc / "train_long.jsonl"
    stdlib = data / "stdlib" / "train.jsonl"
    s0, sr, s1, s2 = (tmp_path / n for n in ("warmup", "rung", "stage1", "stage2"))
    c0 = _config("longctx_warmup")
    assert c0.data.tokenizer == "data/longctx/tokenizer.json" and c0.model.vocab_size == 2048
    assert c0.data.sources == "data/longctx/train_gap_copy.jsonl" and c0.model.smear_keys
    assert c0.model.smear_tokens == 2
    train_and_evaluate(_toy(c0, data, 128, str(lc / "train_gap_copy.jsonl")), s0)
    cr = _toy(_config("longctx_rung"), data, 256, str(lc / "train_rung.jsonl"))
    assert cr.train.init_from == "runs/longctx/warmup" and cr.model.smear_keys
    cr.train.init_from = str(s0)
    train_and_evaluate(cr, sr)
    c1 = _toy(_config("longctx_stage1"), data, 256, f"{stdlib}:0.04,{warm}:0.3,{short}:0.66")
    assert c1.train.init_from == "runs/longctx/rung" and c1.mesh.sp >= 4
    c1.train.init_from = str(sr)
    train_and_evaluate(c1, s1)
    c2 = _toy(_config("longctx_stage2"), data, 512, f"{stdlib}:0.04:512:4,{short}:0.5,{long}:0.5")
    assert c2.model.rope_theta > c1.model.rope_theta and c2.mesh.sp >= 4 and c2.model.smear_keys
    c2.train.init_from = str(s1)
    train_and_evaluate(c2, s2)
    rows = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()

    evals = {}
    for name, workdir in (("stage 1", s1), ("stage 2", s2)):
        out = tmp_path / f"eval_{name[-1]}.json"
        r = run(data=str(lc / "heldout_long.jsonl"), context=512, out=str(out),
                workdir=str(workdir), passkey_file=str(lc / "heldout_passkey.jsonl"),
                progress=False)
        assert r["passkey"]["lengths"] == [512] and r["passkey"]["prompts_by_length"] == [2]
        assert r["loss_by_position"][-1]["end"] == 512
        evals[name] = out
    _probe(s1)
    made = compare(evals, tmp_path / "images")
    assert Path(made["passkey_plot"]).stat().st_size > 0
    assert Path(made["loss_plot"]).stat().st_size > 0
    assert made["markdown"].count("| stage") == 4  # by length, then by distance
    assert Path(made["distance_plot"]).stat().st_size > 0


def _probe(workdir: Path) -> None:
    """The retrieval probe on stage 1's model, on the ring (sp=8, padded to the layout), as
    scripts/longctx_probe.py runs it: its argmax is the plain one-device forward's."""
    import jax.numpy as jnp

    from ringformer import model
    from ringformer.data.tokenizer import load_tokenizer
    from ringformer.eval import retrieval_probe as probe
    from ringformer.eval.tool import eval_mesh, load_model

    mesh, sizes = eval_mesh(None, 256, None)
    assert sizes["sp"] == 8
    cfg, params, spec, _ = load_model(mesh_sizes=sizes, context=256, workdir=str(workdir))
    argmax = probe.model_argmax(cfg, params, mesh)
    ids = np.random.default_rng(0).integers(0, 300, 96).astype(np.int32)
    one = cfg.with_attention(impl="blockwise", layout="contiguous")
    plain = jnp.argmax(model.logits(one, params, ids[None]), -1)
    np.testing.assert_array_equal(argmax(ids), np.asarray(plain)[0])
    r = probe.run_probe(argmax, load_tokenizer(spec), tasks=["passkey", "kv", "heldout_passkey"],
                        lengths=[64, 200], per_length=1, progress=False)
    assert all(total > 0 for _, total in r["counts"]["passkey"][probe.FIRST])
    assert all(0.0 <= a <= 1.0 for t in r["tasks"] for c in probe.CLASSES
               for a in r["accuracy"][t][c] if a is not None)
