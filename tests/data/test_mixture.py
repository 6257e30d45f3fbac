"""Mixtures, length filters, long-document repeats and supervised examples."""

import json

import numpy as np
import pytest

from ringformer.config import check_config, default_config
from ringformer.data import mixture
from ringformer.data import pipeline as data
from ringformer.data.packing import Docs, Packer
from ringformer.data.tokenizer import load_tokenizer
from ringformer.errors import ConfigError, DataError

TOK = load_tokenizer("byte")


def _write(path, letter, lengths):
    path.write_text("".join(json.dumps({"text": letter * int(n)}) + "\n" for n in lengths))
    return str(path)


def _cfg(tmp_path, *, seq_len=32, batch=2, **data_keys):
    c = default_config().data
    c.seq_len, c.global_batch_size, c.cache_dir = seq_len, batch, str(tmp_path / "cache")
    for k, v in data_keys.items():
        c[k] = v
    return c


def _letters(batch):
    toks = batch["tokens"][batch["segment_ids"] > 0]
    return [chr(int(t) - 3) for t in toks if t >= 3]


def test_mixture_proportions_match_the_weights(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", np.arange(1, 301))  # 300 documents
    b = _write(tmp_path / "b.jsonl", "b", np.arange(1, 41))  # 40: repeated to reach 30%
    it = data.TrainIterator(_cfg(tmp_path, sources=f"{a}:0.7,{b}:0.3"), TOK, None, seed=4)
    drawn = np.concatenate([it.plan.documents(e) for e in range(30)])[:10_000]
    share_b = (it.source[drawn] == 1).mean()
    assert len(drawn) == 10_000 and abs(share_b - 0.3) < 0.02, share_b
    # The small source is covered evenly: every one of its documents drawn about as often.
    counts = np.bincount(drawn[it.source[drawn] == 1])
    counts = counts[counts > 0]
    assert len(counts) == 40 and counts.max() - counts.min() <= 1
    # Same seed, same draws; batches carry both sources.
    again = data.TrainIterator(_cfg(tmp_path, sources=f"{a}:0.7,{b}:0.3"), TOK, None, seed=4)
    np.testing.assert_array_equal(again.plan.documents(3), it.plan.documents(3))
    seen = set()
    for _ in range(20):
        seen |= set(_letters(it.next_host_batch()))
    assert seen == {"a", "b"}


def test_resume_mid_epoch_from_the_cache_is_bitwise(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", np.arange(1, 60))
    b = _write(tmp_path / "b.jsonl", "b", np.arange(5, 200, 7))
    cfg = _cfg(tmp_path, sources=f"{a}:0.5,{b}:0.5:100:3")
    ref = data.TrainIterator(cfg, TOK, None, seed=2)
    want = [ref.next_host_batch() for _ in range(3 * ref.rows_per_epoch // 2)]
    for k in (0, 5, len(want) // 2, len(want) - 3):
        it = data.TrainIterator(cfg, TOK, None, seed=2)
        for _ in range(k):
            it.next_host_batch()
        resumed = data.TrainIterator(cfg, TOK, None, seed=9,
                                     state=json.loads(json.dumps(it.state())))
        for w in want[k:k + 3]:
            got = resumed.next_host_batch()
            for f in data.FIELDS:
                np.testing.assert_array_equal(got[f], w[f])
    assert ref.state()["epoch"] >= 1


def test_two_processes_read_disjoint_shares_that_cover_the_data(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", np.arange(1, 30))
    b = _write(tmp_path / "b.jsonl", "b", np.arange(1, 30))
    cfg = _cfg(tmp_path, sources=f"{a}:1,{b}:1", batch=4)
    its = [data.TrainIterator(cfg, TOK, None, seed=0, process_index=p, process_count=2)
           for p in range(2)]
    mine = [{(int(s), int(it.docs.start[d])) for d, s in enumerate(it.source)} for it in its]
    assert not mine[0] & mine[1]
    assert sum(len(m) for m in mine) == 58


def test_length_filters_drop_and_keep(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", [5, 10, 20, 40, 80])
    cfg = _cfg(tmp_path, train_files=a, min_doc_tokens=11, max_doc_tokens=41)
    it = data.TrainIterator(cfg, TOK, None, seed=0)
    assert sorted(it.docs.length.tolist()) == [10, 20, 40]  # packed: +1 EOS
    with pytest.raises(DataError, match="leave no documents") as e:
        data.TrainIterator(_cfg(tmp_path, train_files=a, min_doc_tokens=500), TOK, None, seed=0)
    assert "min_doc_tokens" in e.value.fix


def test_long_documents_are_repeated(tmp_path):
    a = _write(tmp_path / "a.jsonl", "a", [3, 4, 50, 5, 60])
    it = data.TrainIterator(_cfg(tmp_path, train_files=a, upsample_long="40:3"), TOK, None,
                            seed=0)
    drawn = it.plan.documents(0)
    assert sorted(np.bincount(drawn, minlength=5).tolist()) == [1, 1, 1, 3, 3]
    assert (np.bincount(drawn)[it.docs.length >= 40] == 3).all()


def test_bad_mixture_settings_are_config_errors(tmp_path):
    for key, value, match in [("sources", "a.jsonl:0", "weights must be positive"),
                              ("sources", "a.jsonl:-1,b.jsonl:1", "weights must be positive"),
                              ("sources", "a:1:2", "not FILES:WEIGHT"),
                              ("upsample_long", "100", "TOKENS:REPEAT"),
                              ("max_doc_tokens", -3, "negative")]:
        c = default_config()
        c.data[key] = value
        with pytest.raises(ConfigError, match=match):
            check_config(c)
    assert mixture.quotas(10, np.array([0.7, 0.3])).tolist() == [7, 3]


# ----------------------------------------------------------------------------- supervised

def test_supervised_examples_train_on_the_response_only(tmp_path):
    rows = [{"prompt": "Q" * n, "response": "R" * (n // 2 + 1)} for n in (3, 9, 14, 20, 6)]
    rows.append({"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]})
    rows.append({"text": "plain document"})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    it = data.TrainIterator(_cfg(tmp_path, train_files=str(path), seq_len=31, batch=1), TOK,
                            None, seed=1)
    packer, _ = it._epoch(0)
    targets_with_loss, prompt_targets = [], 0
    for r in range(packer.n_rows):
        b = packer.batch([r])
        tgt, mask, segs = b["targets"][0], b["loss_mask"][0], b["segment_ids"][0]
        chars = np.array([chr(t - 3) if t >= 3 else "" for t in tgt])
        prompt_targets += int(((chars == "Q") & (mask > 0)).sum())
        targets_with_loss.extend(chars[mask > 0])
        # No example is split: each starts at position 0 of its row (all fit a row); the
        # plain document may be split.
        toks = np.array([chr(t - 3) if t >= 3 else "" for t in b["tokens"][0]])
        for s in np.unique(segs[segs > 0]):
            if set(toks[segs == s]) & set("QRy"):
                assert b["positions"][0][segs == s][0] == 0
    assert prompt_targets == 0
    assert targets_with_loss.count("R") == sum(n // 2 + 1 for n in (3, 9, 14, 20, 6))
    assert "y" in targets_with_loss and "h" not in targets_with_loss  # chat: answer only
    assert "d" in targets_with_loss  # a plain document trains on everything


def test_packer_keeps_examples_whole_unless_longer_than_a_row():
    lengths = np.array([5, 6, 20, 4])
    values = np.arange(3, 3 + lengths.sum()).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    base = Docs.from_offsets(values, offsets)
    docs = Docs(base.shards, base.shard, base.start, base.length, np.array([2, 2, 3, 1]))
    p = Packer(docs, row_len=8, eos_id=1, pad_id=0)
    # 5+1 in row 0; 6+1 does not fit the 2 left: row 1; 20+1 > a row: streams on from 15;
    # 4+1 does not fit the 4 left of row 4: row 5.
    assert p.starts.tolist() == [0, 8, 15, 40]
    _toks, segs, pos = p.rows(range(p.n_rows))
    assert (segs[0, 6:] == 0).all() and pos[1, 0] == 0
