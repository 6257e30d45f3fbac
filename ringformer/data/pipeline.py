"""The data path: local files -> tokens (cached) -> packed rows -> global batches.

- `load_documents` (from `ringformer.data.sources`) reads and checks the files.
- `tokenize_documents` runs `datasets.map(batched=True)` once and keeps the result on disk,
  keyed by the files' sizes and mtimes, the text field, the tokenizer and the process's share,
  so the next run loads it memory-mapped and skips both reading and tokenizing.
- `TrainIterator` packs (ringformer.data.packing), shuffles from the seed, applies the sequence
  layout on the host and yields global `jax.Array`s with `batch_sharding(mesh)`. Its
  `state()` is a small dict the trainer stores with every checkpoint.
- `eval_batches` is the same path without shuffling, finite, padding the last batch.
- `document_tokens` gives whole documents for the long-document evaluator.

Document ids: `[BOS] + encode(text) + [EOS]`, BOS only when the tokenizer has one (the byte
tokenizer has none). Batch fields are [batch, seq_len]: tokens, targets, segment_ids and
positions (int32), loss_mask (float32); see `ringformer.data.packing`.

Shares: the mesh's batch axes (dp x fsdp) cut every global batch into groups of rows, one per
distinct set of rows a device holds; each group is a *share*. Documents are dealt to shares
round-robin and every share packs and shuffles its own documents, so the batches depend on
the seed and dp x fsdp only, never on how many processes run them: one process with 8 devices
sees exactly the batches of two processes with 4. A process tokenizes and packs only the
shares its devices hold (several, when it holds several groups of rows); processes holding
the same rows (the sequence split over hosts) produce the same share.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from ringformer.data.packing import FIELDS, Packer, to_batch
from ringformer.data.sources import DataWarning, datasets, load_documents, load_paths, resolve_files
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import DataError
from ringformer.ops import layouts
from ringformer.sharding import batch_sharding

# `datasets` comes through sources, which makes it offline-only before its first import.

__all__ = ["FIELDS", "DataWarning", "TrainIterator", "document_tokens", "eval_batches",
           "eval_host_batches", "load_documents", "make_train_iterator", "tokenize_documents"]

CACHE_VERSION = 1
IDS_FEATURES = datasets.Features({"ids": datasets.List(datasets.Value("int32"))})


# --------------------------------------------------------------------------- tokenization

def _cache_root(paths: Sequence[Path], cache_dir: str) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else \
        (paths[0] if paths[0].is_dir() else paths[0].parent) / ".cache"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    # Read-only data (a shared mount): cache per user instead of failing.
    fallback = Path.home() / ".cache" / "ringformer"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _cache_key(paths: Sequence[Path], text_field: str, tok: Tokenizer, share: int,
               n_shares: int) -> str:
    h = hashlib.sha256()
    stats = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stats.append([str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                           for f in files])
    h.update(json.dumps([CACHE_VERSION, stats, text_field, tok.name, tok.fingerprint,
                         tok.bos_id, share, n_shares]).encode())
    return h.hexdigest()[:20]


def tokenize_documents(files: str | Sequence[str], tokenizer: Tokenizer, *,
                       text_field: str = "text", cache_dir: str = "", share: int = 0,
                       n_shares: int = 1) -> datasets.Dataset:
    """Token ids (column `ids`, BOS included when the tokenizer has one, no EOS) of the
    documents `share, share + n_shares, ...` of `files`; cached on disk after the first call."""
    paths = resolve_files(files)
    entry = _cache_root(paths, cache_dir) / \
        f"tokens-{_cache_key(paths, text_field, tokenizer, share, n_shares)}"
    if (entry / "state.json").is_file():
        return datasets.load_from_disk(str(entry))

    docs = load_paths(paths, text_field=text_field)
    if n_shares > 1:
        if len(docs) < n_shares:
            raise DataError(f"{len(docs)} documents cannot be dealt to {n_shares} batch shards "
                            "(mesh dp*fsdp)", "add documents or use a smaller dp*fsdp")
        docs = docs.shard(num_shards=n_shares, index=share, contiguous=False)
    bos = tokenizer.bos_id

    def encode(batch: dict) -> dict:
        ids = tokenizer.encode_arrays(batch["text"])
        if bos is not None:
            ids = [np.concatenate([np.array([bos], np.int32), a]) for a in ids]
        return {"ids": ids}

    tokens = docs.map(encode, batched=True, batch_size=256, remove_columns=["text"],
                      features=IDS_FEATURES, desc="tokenizing", new_fingerprint=entry.name)
    # Write under a private name, then rename: a crash never leaves a half cache behind.
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    tokens.save_to_disk(str(tmp))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(entry))


def _flat_ids(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of the `ids` column without a Python list per document."""
    col = ds.with_format(None).data.table.column("ids")
    values, offsets, base = [], [np.zeros(1, np.int64)], 0
    for chunk in col.chunks:
        off = np.asarray(chunk.offsets, dtype=np.int64)
        values.append(np.asarray(chunk.flatten(), dtype=np.int32))
        offsets.append(off[1:] - off[0] + base)
        base += int(off[-1] - off[0])
    vals = np.concatenate(values) if values else np.zeros(0, np.int32)
    return vals, np.concatenate(offsets)


def document_tokens(files: str | Sequence[str], tokenizer: Tokenizer,
                    text_field: str = "text", *, cache_dir: str = "") -> list[np.ndarray]:
    """One int32 array per document, in file order: `[BOS] + ids + [EOS]` (BOS if any)."""
    values, offsets = _flat_ids(tokenize_documents(files, tokenizer, text_field=text_field,
                                                   cache_dir=cache_dir))
    eos = np.array([tokenizer.eos_id], np.int32)
    return [np.concatenate([values[offsets[i]:offsets[i + 1]], eos])
            for i in range(len(offsets) - 1)]


# --------------------------------------------------------------------------- shares

def _shares(mesh: Mesh | None, global_batch: int, seq_len: int, process_index: int | None,
            process_count: int | None) -> tuple[list[np.ndarray], list[int]]:
    """(rows of each share, the shares this process holds).

    Derived from where the mesh puts batch rows (one share per distinct set of rows a device
    holds); `process_index`/`process_count` simulate a plain split of the batch over
    processes (tests, host-only use).
    """
    if process_count is not None or mesh is None:
        n = process_count or 1
        p = process_index or 0
        if global_batch % n or not 0 <= p < n:
            raise DataError(f"global batch {global_batch} cannot be split over {n} processes "
                            f"(process {p})", f"use a batch size divisible by {n}")
        return list(np.arange(global_batch).reshape(n, -1)), [p]
    rows_of: dict[int, set[int]] = {}
    for dev, idx in batch_sharding(mesh).devices_indices_map((global_batch, seq_len)).items():
        rows_of[dev.id] = set(range(*idx[0].indices(global_batch)))
    shares, _ = group_shares(rows_of, next(iter(rows_of)), global_batch)
    first_row = {int(r[0]): k for k, r in enumerate(shares)}
    mine = sorted({first_row[min(rows_of[d.id])] for d in mesh.devices.flat
                   if d.process_index == jax.process_index()})
    return shares, mine


def group_shares(rows_of: dict[int, set[int]], me: int,
                 global_batch: int) -> tuple[list[np.ndarray], int]:
    """Processes holding the same batch rows form one share: (rows of each share, mine)."""
    distinct = sorted({tuple(sorted(r)) for r in rows_of.values()}, key=lambda r: r[0])
    if sorted(i for r in distinct for i in r) != list(range(global_batch)):
        raise DataError("processes hold overlapping but different batch rows on this mesh",
                        "use a mesh whose dp/fsdp axes split the batch evenly over processes")
    return [np.array(r) for r in distinct], distinct.index(tuple(sorted(rows_of[me])))


def _check_shape(mesh: Mesh | None, layout: str, seq_len: int) -> int:
    sp = 1 if mesh is None else int(mesh.shape["sp"])
    try:
        layouts.permutation(layout, seq_len, sp)
    except ValueError as e:
        raise DataError(str(e), "choose data.seq_len as a multiple of the layout's unit") from None
    return sp


# --------------------------------------------------------------------------- iterators

class _Stream:
    """Shared plumbing: this share's packed rows, layout, and host -> global arrays."""

    def __init__(self, files, config_data, tokenizer: Tokenizer, mesh: Mesh | None, *,
                 layout: str, process_index: int | None, process_count: int | None,
                 share: tuple[list[np.ndarray], int] | None = None):
        self.tokenizer, self.mesh, self.layout = tokenizer, mesh, layout
        self.seq_len = int(config_data.seq_len)
        self.global_batch = int(config_data.global_batch_size)
        self.sp = _check_shape(mesh, layout, self.seq_len)
        if share is None:  # the first share this process holds; `_siblings` handle the rest
            self.share_rows, mine = _shares(mesh, self.global_batch, self.seq_len,
                                            process_index, process_count)
            self.share, self.other_shares = mine[0], mine[1:]
        else:
            (self.share_rows, self.share), self.other_shares = share, []
        self._siblings: list = []
        self.simulated = process_count is not None and process_count != jax.process_count()
        self.rows_per_batch = len(self.share_rows[self.share])
        ds = tokenize_documents(files, tokenizer, text_field=config_data.get("text_field", "text"),
                                cache_dir=config_data.get("cache_dir", "") or "",
                                share=self.share, n_shares=len(self.share_rows))
        self.values, self.offsets = _flat_ids(ds)
        self.n_docs = len(self.offsets) - 1

    def _packer(self, order: np.ndarray | None) -> Packer:
        return Packer(self.values, self.offsets, row_len=self.seq_len + 1,
                      eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, order=order)

    def _host(self, packer: Packer, rows: Sequence[int]) -> dict[str, np.ndarray]:
        batch = to_batch(*packer.rows(rows))
        return {k: np.ascontiguousarray(layouts.permute(v, self.layout, self.sp, axis=1))
                for k, v in batch.items()}

    def _with_siblings(self, own: dict[str, np.ndarray],
                       theirs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """This process's rows of a batch from its shares' rows: each share's row i is global
        row `share_rows[share][i]`, and local data lists the process's rows in global order."""
        if not theirs:
            return own
        parts = [(self.share_rows[self.share], own)] + \
            [(s.share_rows[s.share], h) for s, h in zip(self._siblings, theirs, strict=True)]
        rows = np.sort(np.concatenate([r for r, _ in parts]))
        out = {}
        for k in own:
            out[k] = np.empty((len(rows), *own[k].shape[1:]), own[k].dtype)
            for r, h in parts:
                out[k][np.searchsorted(rows, r)] = h[k]
        return out

    def _global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mesh is None or self.simulated:
            raise ValueError("this iterator simulates other processes or has no mesh; "
                             "use next_host_batch()")
        sharding = batch_sharding(self.mesh)
        shape = (self.global_batch, self.seq_len)
        return {k: jax.make_array_from_process_local_data(sharding, v, shape)
                for k, v in host.items()}


class TrainIterator(_Stream):
    """Endless, shuffled, resumable global batches of `config_data.train_files`.

    Epoch `e` packs this share's documents in the order `permutation(seed, e)` and visits the
    rows in another seeded permutation (a long document's rows land in different batches).
    Without `shuffle`, documents and rows stay in file order. Batches may straddle epochs.
    """

    def __init__(self, config_data, tokenizer: Tokenizer, mesh: Mesh | None, *, seed: int,
                 layout: str = "contiguous", shuffle: bool = True, state: dict | None = None,
                 files: str | Sequence[str] | None = None, process_index: int | None = None,
                 process_count: int | None = None,
                 _share: tuple[list[np.ndarray], int] | None = None):
        super().__init__(config_data.train_files if files is None else files, config_data,
                         tokenizer, mesh, layout=layout, process_index=process_index,
                         process_count=process_count, share=_share)
        self._siblings = [TrainIterator(config_data, tokenizer, mesh, seed=seed, layout=layout,
                                        shuffle=shuffle, files=files,
                                        _share=(self.share_rows, k))
                          for k in self.other_shares]
        self.seed, self.shuffle = int(seed), shuffle
        self.batches = 0  # batches consumed: the one number every share agrees on
        # Any document order packs into the same number of rows: the token count is fixed.
        self.rows_per_epoch = max(1, -(-(len(self.values) + self.n_docs) // (self.seq_len + 1)))
        self._epoch_cache: tuple[int, Packer, np.ndarray] | None = None
        if state is not None:
            self.restore(state)

    def _epoch(self, epoch: int) -> tuple[Packer, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed % 2**63, epoch, self.share])  # seeds >= 0
                packer = self._packer(rng.permutation(self.n_docs))
                visit = rng.permutation(packer.n_rows)
            else:
                packer = self._packer(None)
                visit = np.arange(packer.n_rows)
            self._epoch_cache = (epoch, packer, visit)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _position(self) -> tuple[int, int]:
        consumed = self.batches * self.rows_per_batch
        return divmod(consumed, self.rows_per_epoch)

    def next_host_batch(self) -> dict[str, np.ndarray]:
        """This process's rows of the next batch as numpy, layout applied, [rows, seq_len]."""
        epoch, pos = self._position()
        parts = []
        need = self.rows_per_batch
        while need:
            packer, visit = self._epoch(epoch)
            take = min(need, packer.n_rows - pos)
            parts.append((packer, visit[pos:pos + take]))
            need -= take
            epoch, pos = epoch + 1, 0
        self.batches += 1
        hosts = [self._host(p, rows) for p, rows in parts]
        own = {k: np.concatenate([h[k] for h in hosts]) for k in FIELDS}
        return self._with_siblings(own, [s.next_host_batch() for s in self._siblings])

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return self._global(self.next_host_batch())

    def state(self) -> dict:
        """JSON-serialisable position. `batches` is authoritative; epoch/position are the
        view of this process's first share, kept for people reading checkpoints.

        Restoring `batches` on another mesh (elastic resume with another dp*fsdp) continues
        at the same fraction of an epoch, but with that mesh's shares, hence other batches."""
        epoch, pos = self._position()
        return {"seed": self.seed, "batches": self.batches, "epoch": epoch, "position": pos}

    def restore(self, state: dict) -> None:
        """Continue exactly after the batch at which `state` was taken."""
        try:
            seed = int(state["seed"])
            if "batches" in state:
                batches = int(state["batches"])
            else:  # a state written by hand: epoch and row position of this share
                rows = int(state["epoch"]) * self.rows_per_epoch + int(state["position"])
                batches = rows // self.rows_per_batch
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"bad data iterator state {state!r}: {e}",
                            "pass the dict returned by TrainIterator.state()") from None
        if seed != self.seed:
            self.seed, self._epoch_cache = seed, None  # the saved run's order, not ours
        self.batches = batches
        for s in self._siblings:
            s.restore({"seed": seed, "batches": batches})


def make_train_iterator(config_data, tokenizer: Tokenizer, mesh: Mesh | None, *, seed: int,
                        layout: str = "contiguous", state: dict | None = None,
                        **kwargs) -> TrainIterator:
    return TrainIterator(config_data, tokenizer, mesh, seed=seed, layout=layout, state=state,
                         **kwargs)


class _EvalStream(_Stream):
    def __init__(self, config_data, tokenizer, mesh, *, layout, files, process_index,
                 process_count, _share=None):
        super().__init__(config_data.eval_files if files is None else files, config_data,
                         tokenizer, mesh, layout=layout, process_index=process_index,
                         process_count=process_count, share=_share)
        self.packer = self._packer(None)
        rows = self.packer.n_rows
        if _share is not None:
            return  # a sibling: the first share's stream counts batches for all
        self._siblings = [_EvalStream(config_data, tokenizer, mesh, layout=layout, files=files,
                                      process_index=None, process_count=None,
                                      _share=(self.share_rows, k)) for k in self.other_shares]
        rows = max([rows] + [s.packer.n_rows for s in self._siblings])
        if jax.process_count() > 1 and not self.simulated:
            # Every process must run the same number of eval steps or collectives hang.
            from jax.experimental import multihost_utils

            rows = int(np.max(multihost_utils.process_allgather(np.array(rows))))
        self.n_batches = -(-rows // self.rows_per_batch)

    def host_batches(self, n_batches: int | None) -> Iterator[dict[str, np.ndarray]]:
        n = self.n_batches if n_batches is None else min(n_batches, self.n_batches)
        for b in range(n):
            yield self._with_siblings(self._batch(b), [s._batch(b) for s in self._siblings])

    def _batch(self, b: int) -> dict[str, np.ndarray]:
        rows = np.arange(b * self.rows_per_batch, (b + 1) * self.rows_per_batch)
        return self._host(self.packer, np.where(rows < self.packer.n_rows, rows, -1))


def eval_host_batches(config_data, tokenizer: Tokenizer, mesh: Mesh | None = None, *,
                      n_batches: int | None = None, layout: str = "contiguous",
                      files: str | Sequence[str] | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Numpy version of `eval_batches` (this process's rows)."""
    stream = _EvalStream(config_data, tokenizer, mesh, layout=layout, files=files,
                         process_index=process_index, process_count=process_count)
    return stream.host_batches(n_batches)


def eval_batches(config_data, tokenizer: Tokenizer, mesh: Mesh, *, n_batches: int | None = None,
                 layout: str = "contiguous",
                 files: str | Sequence[str] | None = None) -> Iterator[dict[str, jax.Array]]:
    """`config_data.eval_files` in file order, every document whole, as global batches.

    Yields the first `n_batches` batches (all when None; at most as many as the data fills).
    The last batch is padded with rows whose loss_mask is 0, so a loss averaged with the mask
    counts every token once. Data is read (and checked) before the first batch is asked for.
    """
    stream = _EvalStream(config_data, tokenizer, mesh, layout=layout, files=files,
                         process_index=None, process_count=None)
    return (stream._global(h) for h in stream.host_batches(n_batches))
