"""Data pipeline: packing, shuffling, resuming, process shares, layouts, caching, formats."""

import json
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from ringformer.config import default_config
from ringformer.data import pipeline as data
from ringformer.data.packing import Packer
from ringformer.data.tokenizer import ByteTokenizer, load_tokenizer
from ringformer.errors import DataError
from ringformer.mesh import make_mesh
from ringformer.ops import layouts as layout
from ringformer.sharding import batch_sharding

TOK = load_tokenizer("byte")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _letter_docs(n=20, seed=0):
    """Doc i is one letter, unique to it, repeated a distinct number of times: any piece of a
    packed row tells which document it came from and (by its positions) where."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(np.arange(1, 90), size=n, replace=False)
    return [LETTERS[i] * int(k) for i, k in enumerate(lengths)]


def _cfg(files, *, seq_len=16, batch=4, eval_files=None):
    c = default_config().data
    c.train_files, c.eval_files = files, eval_files or files
    c.seq_len, c.global_batch_size = seq_len, batch
    return c


@pytest.fixture
def corpus(tmp_path):
    docs = _letter_docs()
    return docs, _write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in docs])


def _expected_rows(docs_ids, row_len, pad):
    """Naive oracle: build the whole stream, then cut it."""
    toks = np.concatenate([np.append(d, 1) for d in docs_ids])
    pos = np.concatenate([np.arange(len(d) + 1) for d in docs_ids])
    doc = np.concatenate([np.full(len(d) + 1, i) for i, d in enumerate(docs_ids)])
    n_rows = -(-len(toks) // row_len)
    fill = n_rows * row_len - len(toks)
    toks = np.append(toks, np.full(fill, pad)).reshape(n_rows, row_len)
    pos = np.append(pos, np.zeros(fill, int)).reshape(n_rows, row_len)
    doc = np.append(doc, np.full(fill, -1)).reshape(n_rows, row_len)
    segs = np.zeros_like(doc)
    for r in range(n_rows):
        real = doc[r] >= 0
        segs[r, real] = doc[r, real] - doc[r, real][0] + 1  # documents are consecutive
    return toks, segs, pos


def _rows_of(batch):
    """Back from model inputs to full rows (tokens + the last target)."""
    return np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)


# ----------------------------------------------------------------------------- packing

def test_packer_matches_naive_stream():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 259, size=n) for n in (5, 40, 1, 0, 13, 70, 7)]
    offsets = np.cumsum([0] + [len(d) for d in docs])
    p = Packer(np.concatenate(docs).astype(np.int32), offsets, row_len=17, eos_id=1, pad_id=0)
    toks, segs, pos = p.rows(range(p.n_rows))
    e_toks, e_segs, e_pos = _expected_rows(docs, 17, 0)
    np.testing.assert_array_equal(toks, e_toks)
    np.testing.assert_array_equal(segs, e_segs)
    np.testing.assert_array_equal(pos, e_pos)
    # A 70-token document spans rows and keeps counting: some row starts mid-document.
    assert (pos[:, 0] > 0).any()


def test_loss_mask_and_boundaries():
    toks = np.array([[5, 6, 1, 7, 8, 1, 0, 0]])
    segs = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    from ringformer.data.packing import to_batch

    b = to_batch(toks, segs, np.array([[0, 1, 2, 0, 1, 2, 0, 0]]))
    # predict 6, eos | not 7 from eos | 8, eos | nothing on padding
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["targets"][0], toks[0, 1:])
    assert b["loss_mask"].dtype == np.float32


def test_iterator_without_shuffle_is_the_stream(corpus):
    docs, path = corpus
    it = data.TrainIterator(_cfg(path, batch=1), TOK, None, seed=0, shuffle=False)
    rows = [it.next_host_batch() for _ in range(it.rows_per_epoch)]
    e_toks, e_segs, e_pos = _expected_rows([TOK.encode(d) for d in docs], 17, TOK.pad_id)
    np.testing.assert_array_equal(np.concatenate([_rows_of(b) for b in rows]), e_toks)
    np.testing.assert_array_equal(np.concatenate([b["segment_ids"] for b in rows]),
                                  e_segs[:, :-1])
    np.testing.assert_array_equal(np.concatenate([b["positions"] for b in rows]), e_pos[:, :-1])
    assert {k: v.shape for k, v in rows[0].items()} == {k: (1, 16) for k in data.FIELDS}
    assert it.state() == {"seed": 0, "batches": it.rows_per_epoch, "epoch": 1, "position": 0}


def test_shuffled_epoch_covers_every_token_once(corpus):
    docs, path = corpus
    it = data.TrainIterator(_cfg(path, batch=1), TOK, None, seed=3)
    by_letter = {d[0]: d for d in docs}
    covered = {d: np.zeros(len(d) + 1, int) for d in docs}  # +1: the EOS
    for _ in range(it.rows_per_epoch):
        b = {k: v[0] for k, v in it.next_host_batch().items()}
        for s in np.unique(b["segment_ids"][b["segment_ids"] > 0]):
            sel = b["segment_ids"] == s
            toks, pos = b["tokens"][sel], b["positions"][sel]
            letters = {chr(int(x) - 3) for x in toks if x != TOK.eos_id}
            # Single-letter documents of distinct lengths: an EOS alone is found by position.
            doc = by_letter[letters.pop()] if letters else next(d for d in docs
                                                                if len(d) == pos[0])
            want = np.append(TOK.encode(doc), TOK.eos_id)
            np.testing.assert_array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))
            np.testing.assert_array_equal(toks, want[pos[0]:pos[0] + len(pos)])
            covered[doc][pos] += 1
        # The row's last token is only a target: same document, or the start of the next one.
        last = int(b["targets"][-1])
        if b["loss_mask"][-1]:
            doc = by_letter[chr(int(b["tokens"][-1]) - 3)]  # an EOS never has a successor
            covered[doc][b["positions"][-1] + 1] += 1
        elif last != TOK.pad_id:
            covered[by_letter[chr(last - 3)]][0] += 1
    assert all((c == 1).all() for c in covered.values()), covered
    assert it.state()["epoch"] == 1


def test_same_seed_same_batches_other_seed_differs(corpus):
    _, path = corpus
    a, b, c = (data.TrainIterator(_cfg(path), TOK, None, seed=s) for s in (7, 7, 8))
    for _ in range(5):
        x, y, z = a.next_host_batch(), b.next_host_batch(), c.next_host_batch()
        for k in data.FIELDS:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["tokens"], z["tokens"])


def test_restore_continues_exactly(corpus):
    _, path = corpus
    cfg = _cfg(path, batch=2)
    ref = data.TrainIterator(cfg, TOK, None, seed=5)
    # Run well past an epoch so the restore crosses an epoch boundary too.
    total = ref.rows_per_epoch  # batches: two epochs of rows at 2 rows per batch
    uninterrupted = [ref.next_host_batch() for _ in range(total)]
    for k in (0, 3, total // 2 + 1, total - 2):
        it = data.TrainIterator(cfg, TOK, None, seed=5)
        for _ in range(k):
            it.next_host_batch()
        saved = json.loads(json.dumps(it.state()))
        resumed = data.TrainIterator(cfg, TOK, None, seed=999, state=saved)  # state wins
        for want in uninterrupted[k:k + 3]:
            got = resumed.next_host_batch()
            for f in data.FIELDS:
                np.testing.assert_array_equal(got[f], want[f])
    assert ref.state()["epoch"] >= 1


def test_bad_state_is_a_data_error(corpus):
    _, path = corpus
    it = data.TrainIterator(_cfg(path), TOK, None, seed=0)
    with pytest.raises(DataError, match="bad data iterator state"):
        it.restore({"position": 3})


def test_two_processes_get_disjoint_shares(corpus):
    docs, path = corpus
    cfg = _cfg(path, batch=4)
    shares = [data.TrainIterator(cfg, TOK, None, seed=1, process_index=p, process_count=2)
              for p in range(2)]
    seen = []
    for it in shares:
        b = it.next_host_batch()
        assert b["tokens"].shape == (2, 16)  # half of the global batch each
        letters = set()
        for _ in range(it.rows_per_epoch):
            letters |= {chr(int(x) - 3) for x in it.next_host_batch()["tokens"].ravel()
                        if x >= 3}
        seen.append(letters)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {d[0] for d in docs}
    # The global batch is the shares' rows stacked in order.
    again = [data.TrainIterator(cfg, TOK, None, seed=1, process_index=p, process_count=2)
             for p in range(2)]
    whole = np.concatenate([it.next_host_batch()["tokens"] for it in again])
    assert whole.shape == (4, 16)
    with pytest.raises(ValueError, match="simulates other processes"):
        next(again[0])


def test_processes_holding_the_same_rows_share_documents():
    # 4 processes: batch split in two over (dp, fsdp), sequence split over process pairs.
    rows_of = {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}
    shares, mine = data.group_shares(rows_of, 3, 4)
    assert [s.tolist() for s in shares] == [[0, 1], [2, 3]] and mine == 1
    # Rows need not be contiguous: make_array_from_process_local_data stacks them in order.
    shares, mine = data.group_shares({0: {0, 2}, 1: {1, 3}}, 0, 4)
    assert [s.tolist() for s in shares] == [[0, 2], [1, 3]] and mine == 0
    with pytest.raises(DataError, match="overlapping"):
        data.group_shares({0: {0, 1}, 1: {1, 2, 3}}, 0, 4)
    # One process, every device: a share per group of rows the mesh makes, all of them mine
    # (the batches depend on dp*fsdp, not on the number of processes).
    mesh = make_mesh({"dp": 2, "fsdp": 2, "sp": 2, "tp": 1})
    shares, mine = data._shares(mesh, 4, 16, None, None)
    assert [s.tolist() for s in shares] == [[0], [1], [2], [3]] and mine == [0, 1, 2, 3]


def test_mesh_batch_is_global_and_sharded(corpus):
    _, path = corpus
    mesh = make_mesh({"dp": 2, "fsdp": 2, "sp": 2, "tp": 1})
    cfg = _cfg(path, batch=4)
    it = data.TrainIterator(cfg, TOK, mesh, seed=0, layout="zigzag")
    host = data.TrainIterator(cfg, TOK, mesh, seed=0, layout="zigzag").next_host_batch()
    batch = next(it)
    for k in data.FIELDS:
        assert isinstance(batch[k], jax.Array)
        assert batch[k].shape == (4, 16)
        assert batch[k].sharding == batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch[k]), host[k])
    assert batch["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("name", ["striped", "zigzag"])
def test_layout_is_permute_of_contiguous(corpus, name):
    _, path = corpus
    mesh = make_mesh({"dp": 1, "fsdp": 2, "sp": 4, "tp": 1})
    cfg = _cfg(path, batch=2)
    plain = data.TrainIterator(cfg, TOK, mesh, seed=2).next_host_batch()
    laid = data.TrainIterator(cfg, TOK, mesh, seed=2, layout=name).next_host_batch()
    for k in data.FIELDS:
        np.testing.assert_array_equal(laid[k], layout.permute(plain[k], name, 4, axis=1))
        assert not np.array_equal(laid[k], plain[k]) or k == "loss_mask"


# ----------------------------------------------------------------------------- caching

class CountingTokenizer(ByteTokenizer):
    calls = 0

    def encode_arrays(self, texts):
        CountingTokenizer.calls += len(texts)
        return super().encode_arrays(texts)


def test_tokenization_is_cached(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _letter_docs(5)])
    cfg = _cfg(path)
    cfg.cache_dir = str(tmp_path / "cache")
    CountingTokenizer.calls = 0
    first = data.TrainIterator(cfg, CountingTokenizer(), None, seed=0).next_host_batch()
    assert CountingTokenizer.calls == 5
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 1
    second = data.TrainIterator(cfg, CountingTokenizer(), None, seed=0).next_host_batch()
    assert CountingTokenizer.calls == 5, "second run tokenized again"
    np.testing.assert_array_equal(first["tokens"], second["tokens"])
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "changed"}] * 3)
    data.TrainIterator(cfg, CountingTokenizer(), None, seed=0)
    assert CountingTokenizer.calls == 8, "a changed file must be tokenized again"


def test_default_cache_sits_next_to_the_data(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    data.tokenize_documents(path, TOK)
    assert list((tmp_path / ".cache").glob("tokens-*"))


# ----------------------------------------------------------------------------- evaluation

def test_eval_batches_keep_every_document_in_order(tmp_path):
    docs = _letter_docs(7, seed=4)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"text": d} for d in docs])
    cfg = _cfg("unused.jsonl", batch=2, eval_files=path)
    batches = list(data.eval_host_batches(cfg, TOK))
    rows = np.concatenate([_rows_of(b) for b in batches])
    stream = np.concatenate([np.append(TOK.encode(d), 1) for d in docs])
    n_rows = -(-len(stream) // 17)
    assert len(batches) == -(-n_rows // 2)
    np.testing.assert_array_equal(rows.ravel()[:len(stream)], stream)
    assert (rows.ravel()[len(stream):] == TOK.pad_id).all()
    # Oracle for the mask: a pair (j, j+1) of the stream inside one row and one document.
    doc_of = np.concatenate([np.full(len(d) + 1, i) for i, d in enumerate(docs)])
    want = np.zeros(rows.shape[0] * 17)
    j = np.arange(len(stream) - 1)
    keep = (j % 17 != 16) & (doc_of[j] == doc_of[j + 1])
    want[j[keep]] = 1
    mask = np.concatenate([b["loss_mask"] for b in batches])
    np.testing.assert_array_equal(mask, want.reshape(-1, 17)[:, :16])
    assert len(list(data.eval_host_batches(cfg, TOK, n_batches=1))) == 1
    again = list(data.eval_host_batches(cfg, TOK))
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in again]),
                                  np.concatenate([b["tokens"] for b in batches]))


def test_eval_batches_are_global_arrays(corpus):
    _, path = corpus
    mesh = make_mesh({"dp": 1, "fsdp": 4, "sp": 2, "tp": 1})
    out = list(data.eval_batches(_cfg(path, batch=4), TOK, mesh, n_batches=2, layout="striped"))
    assert len(out) == 2
    assert out[0]["tokens"].sharding == batch_sharding(mesh)


def test_document_tokens(corpus):
    docs, path = corpus
    got = data.document_tokens(path, TOK)
    assert [g.tolist() for g in got] == [[*TOK.encode(d), TOK.eos_id] for d in docs]


# ----------------------------------------------------------------------------- formats

def test_formats_globs_and_lists(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    (tmp_path / "b.json").write_text('[{"body": "three"}, {"body": "four"}]')
    (tmp_path / "c.txt").write_text("five\nstill five")
    pq.write_table(pa.table({"body": ["six", "seven"], "n": [6, 7]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": ["eight"]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["nine"]})}).save_to_disk(
        str(tmp_path / "dd"))
    want = ["one", "two", "three", "four", "five\nstill five", "six", "seven", "eight", "nine"]
    listed = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.txt", "d.parquet", "saved",
                                          "dd")]
    for spec in (listed, ",".join(listed)):
        ds = data.load_documents(spec, text_field="body")
        assert ds.column_names == ["text"]
        assert ds["text"] == want
    globbed = data.load_documents(str(tmp_path / "*.json*"), text_field="body")
    assert globbed["text"] == ["one", "two", "three", "four"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    (tmp_path / "sub" / "y.txt").write_text("y")
    assert data.load_documents(str(tmp_path / "sub"))["text"] == ["x", "y"]


# ----------------------------------------------------------------------------- bad data

@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("  \n\n", "is empty"),
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:3: invalid JSON"),
    ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: no field 'text' \(fields: body\)"),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' is int, not a string"),
    ('["a", "b"]\n', r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match) as e:
        data.load_documents(str(tmp_path / "bad.jsonl"))
    assert e.value.fix


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        data.load_documents(str(tmp_path / "nope.jsonl"))
    assert "prepare_data" in e.value.fix
    with pytest.raises(DataError, match="no files match"):
        data.load_documents(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match="no data files given"):
        data.load_documents(" , ")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported type '\.csv'"):
        data.load_documents(str(tmp_path / "x.csv"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        data.load_documents(str(tmp_path / "empty_dir"))


def test_bad_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no column 'text' \\(columns: body\\)"):
        data.load_documents(str(tmp_path / "p.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="not string"):
        data.load_documents(str(tmp_path / "n.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read parquet"):
        data.load_documents(str(tmp_path / "junk.parquet"))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good \xff text \xfe\xfd end \xef\xbf\xbd")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "bad \\ud800 escape"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    messages = [str(w.message) for w in caught if issubclass(w.category, data.DataWarning)]
    assert any("a.txt: 3 undecodable" in m for m in messages), messages
    assert any("b.jsonl: 2 undecodable" in m for m in messages), messages
    assert ds["text"][0] == "good \ufffd text \ufffd\ufffd end \ufffd"
    assert ds["text"][1] == "caf\ufffd"
    assert "\ud800" not in ds["text"][2]


def test_script_reports_bad_data_on_one_line(tmp_path):
    code = ("from ringformer.launch.flags import run_main; "
            "from ringformer.data.pipeline import load_documents; "
            f"run_main(lambda: load_documents({str(tmp_path / 'missing.jsonl')!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: data file") and "Traceback" not in r.stderr
