"""The index held in its narrowest dtypes: same values, and no arithmetic that could wrap."""

import json

import ml_collections
import numpy as np

from ringformer.data import cache, mixture, pipeline
from ringformer.data.packing import Docs, Packer
from ringformer.data.tokenizer import load_tokenizer


def test_index_arrays_load_narrow_with_the_same_values(tmp_path):
    for values, dtype in [([0, 5, 255], np.uint8), ([3, 70000], np.uint32),
                          ([1, 2**40], np.int64), ([-1, 4], np.int32)]:
        np.save(tmp_path / "a.npy", np.array(values, np.int64))
        got = cache.load_index_array(tmp_path / "a.npy", block=2)
        assert got.dtype == dtype and got.tolist() == values


def test_filters_and_repeats_do_not_wrap_narrow_lengths():
    lengths = np.array([254, 255, 10], np.uint8)  # packed lengths 255, 256, 11
    assert mixture.length_filter(lengths, 256, 0).tolist() == [1]
    assert mixture.length_filter(lengths, 0, 255).tolist() == [0, 2]
    plan = mixture.Plan([mixture.SourceSpec("x", 1.0, 256, 3)], np.zeros(3, np.uint8),
                        lengths, seed=0, share=0)
    assert not plan.plain and sorted(plan.documents(0).tolist()) == [0, 1, 1, 1, 2]


def test_narrow_order_packs_the_same_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 50)
    docs = Docs.from_offsets(rng.integers(3, 200, int(lengths.sum())).astype(np.int32),
                             np.concatenate([[0], np.cumsum(lengths)]))
    order = rng.permutation(50)
    wide = Packer(docs, row_len=17, eos_id=1, pad_id=0, order=order)
    narrow = Packer(docs, row_len=17, eos_id=1, pad_id=0, order=order.astype(np.int32))
    assert wide.n_rows == narrow.n_rows
    for a, b in zip(wide.rows(range(wide.n_rows)), narrow.rows(range(narrow.n_rows)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_plain_source_holds_no_copy_of_the_index(tmp_path):
    """What keeps a run's memory near 25 bytes a document (docs/BENCHMARKS.md): the share
    reads the entry's narrow index through views, no pool, int32 orders."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * (i % 50 + 1)}) + "\n" for i in range(300)))
    cfg = ml_collections.ConfigDict({"train_files": str(path), "seq_len": 16,
                                     "global_batch_size": 2, "cache_dir": str(tmp_path / "cc")})
    it = pipeline.TrainIterator(cfg, load_tokenizer("byte"), None, seed=0)
    entry = it.opened[0][1]
    assert entry.start.itemsize <= 4 and entry.length.itemsize <= 2 and entry.shard.itemsize == 1
    assert np.shares_memory(it.docs.start, entry.start) and it.plan.pools == []
    it.next_host_batch()
    _, packer, visit = it._epoch_cache
    assert packer.order.dtype == np.int32 and visit.dtype == np.int32
