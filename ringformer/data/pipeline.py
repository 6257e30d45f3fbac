"""The data path: sources -> tokenized cache (memory-mapped) -> packed rows -> global batches.

- `ringformer.data.cache` tokenizes each source once into token shards plus a document index
  and memory-maps them afterwards (keyed by the files' sizes and mtimes, the text field and
  the tokenizer); nothing here holds a corpus in memory, only the index of this share.
- `ringformer.data.mixture` decides which documents an epoch packs: weighted sources
  (`data.sources`), length filters (`data.min_doc_tokens`, `data.max_doc_tokens`) and
  repeats of long documents (`data.upsample_long`).
- `TrainIterator` packs (ringformer.data.packing), shuffles from the seed, applies the sequence
  layout on the host and yields global `jax.Array`s with `batch_sharding(mesh)`. Its
  `state()` is a small dict the trainer stores with every checkpoint.
- `eval_batches` is the same path (the cache, the packer) without shuffling or filters,
  finite, padding the last batch.
- `document_tokens` gives whole documents for the long-document evaluator.

Document ids: `[BOS] + encode(text) + [EOS]`, BOS only when the tokenizer has one (the byte
tokenizer has none). Batch fields are [batch, seq_len]: tokens, targets, segment_ids and
positions (int32), loss_mask (float32); see `ringformer.data.packing`.

Shares: the mesh's batch axes (dp x fsdp) cut every global batch into groups of rows, one per
distinct set of rows a device holds; each group is a *share*. Each source's documents (after
the filters) are dealt to shares round-robin and every share packs and shuffles its own
documents, so the batches depend on the seed and dp x fsdp only, never on how many processes
run them: one process with 8 devices sees exactly the batches of two processes with 4. A
process reads (through the memory map) only the documents of the shares its devices hold;
processes holding the same rows (the sequence split over hosts) produce the same share.

With one source, no filters and no repeats, the batches are those of the earlier in-memory
pipeline bit for bit, so checkpoints written before the cache resume on the same data.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ringformer.data import cache, mixture
from ringformer.data.packing import FIELDS, Docs, Packer
from ringformer.data.sources import DataWarning, load_documents
from ringformer.data.tokenizer import Tokenizer
from ringformer.errors import DataError
from ringformer.ops import layouts
from ringformer.sharding import batch_sharding

__all__ = ["FIELDS", "DataWarning", "TrainIterator", "document_tokens", "eval_batches",
           "eval_host_batches", "load_documents", "tokenize_documents"]


# --------------------------------------------------------------------------- documents

def tokenize_documents(files: str | Sequence[str], tokenizer: Tokenizer, *,
                       text_field: str = "text", cache_dir: str = "") -> cache.Entry:
    """The tokenized cache entry of `files` (built on the first call, mapped afterwards)."""
    return cache.open_source(files, tokenizer, text_field=text_field, cache_dir=cache_dir)


def document_tokens(files: str | Sequence[str], tokenizer: Tokenizer,
                    text_field: str = "text", *, cache_dir: str = "") -> list[np.ndarray]:
    """One int32 array per document, in file order: `[BOS] + ids + [EOS]` (BOS if any)."""
    entry = tokenize_documents(files, tokenizer, text_field=text_field, cache_dir=cache_dir)
    return list(cache.iter_documents(entry, tokenizer.eos_id))


def _filtered(entry: cache.Entry, spec: mixture.SourceSpec, lo: int,
              hi: int) -> np.ndarray | range:
    if lo <= 1 and hi <= 0:  # nothing filtered: a range, not 8 bytes a document
        return range(len(entry))
    kept = mixture.length_filter(entry.length, lo, hi)
    if not len(kept):
        shortest, longest = (int(entry.length.min()) + 1, int(entry.length.max()) + 1) \
            if len(entry) else (0, 0)
        raise DataError(f"data.min_doc_tokens={lo} / data.max_doc_tokens={hi} leave no documents "
                        f"of {spec.files} ({len(entry)} documents of {shortest} to {longest} "
                        "tokens)", "lower data.min_doc_tokens or raise data.max_doc_tokens "
                        "(0: no limit)")
    return kept


def open_sources(config_data, tokenizer: Tokenizer, specs: list[mixture.SourceSpec], *,
                 filters: bool) -> list[tuple[mixture.SourceSpec, cache.Entry, np.ndarray]]:
    """(spec, cache entry, indices of the documents kept by the length filters) per source."""
    lo = int(config_data.get("min_doc_tokens", 0) or 0) if filters else 0
    hi = int(config_data.get("max_doc_tokens", 0) or 0) if filters else 0
    out = []
    for spec in specs:
        entry = cache.open_source(spec.files, tokenizer,
                                  text_field=config_data.get("text_field", "text"),
                                  cache_dir=config_data.get("cache_dir", "") or "")
        out.append((spec, entry, _filtered(entry, spec, lo, hi)))
    return out


def share_docs(opened, share: int, n_shares: int) -> tuple[Docs, np.ndarray]:
    """This share's documents of every source (dealt round-robin) and the source of each."""
    shards, parts, source = [], [], []
    supervised = any(entry.prompt is not None for _, entry, _ in opened)
    for s, (spec, entry, kept) in enumerate(opened):
        if len(kept) < n_shares:
            raise DataError(f"{len(kept)} documents of {spec.files} cannot be dealt to "
                            f"{n_shares} batch shards (mesh dp*fsdp)",
                            "add documents or use a smaller dp*fsdp")
        mine = kept[share::n_shares]
        if isinstance(mine, range):  # unfiltered: views of the index, no copies
            mine = slice(mine.start, mine.stop, mine.step)
        prompt = None if not supervised else entry.prompt[mine] if entry.prompt is not None \
            else np.zeros(len(entry.start[mine]), np.int32)
        shard = entry.shard[mine] + len(shards) if shards else entry.shard[mine]
        parts.append((shard, entry.start[mine], entry.length[mine], prompt))
        source.append(np.full(len(shard), s, np.uint8 if len(opened) < 256 else np.int32))
        shards.extend(entry.shards)
    cols = [c[0] if len(c) == 1 else None if c[0] is None else np.concatenate(c)
            for c in zip(*parts, strict=True)]
    prompt = cols[3] if cols[3] is not None and cols[3].any() else None
    return Docs(shards, cols[0], cols[1], cols[2], prompt), \
        source[0] if len(source) == 1 else np.concatenate(source)


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
        layouts.check(layout, seq_len, sp)
    except ValueError as e:
        raise DataError(str(e), "choose data.seq_len as a multiple of the layout's unit") from None
    return sp


# --------------------------------------------------------------------------- iterators

class _Stream:
    """Shared plumbing: this share's documents, layout, and host -> global arrays."""

    def __init__(self, specs, config_data, tokenizer: Tokenizer, mesh: Mesh | None, *,
                 layout: str, process_index: int | None, process_count: int | None,
                 filters: bool, share: tuple[list[np.ndarray], int] | None = None,
                 opened=None):
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
        self.specs = specs
        # Opened once per process: the sibling shares map the same entries.
        self.opened = opened if opened is not None else \
            open_sources(config_data, tokenizer, specs, filters=filters)
        self.docs, self.source = share_docs(self.opened, self.share, len(self.share_rows))
        self.n_docs = len(self.docs)

    def _packer(self, order: np.ndarray | None) -> Packer:
        return Packer(self.docs, row_len=self.seq_len + 1, eos_id=self.tokenizer.eos_id,
                      pad_id=self.tokenizer.pad_id, order=order)

    def _host(self, packer: Packer, rows: Sequence[int]) -> dict[str, np.ndarray]:
        batch = packer.batch(rows)
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


def _narrow(ids: np.ndarray) -> np.ndarray:
    """Document or row ids (numpy's permutations are int64) as int32: an epoch's order is
    the largest per-document array a run holds, and the values are the same."""
    return ids.astype(np.int32) if len(ids) < 2**31 else ids


def _visit(rng: np.random.Generator, n_rows: int, shuffle: bool) -> np.ndarray:
    return _narrow(rng.permutation(n_rows) if shuffle else np.arange(n_rows))


class TrainIterator(_Stream):
    """Endless, shuffled, resumable global batches of the training sources.

    Epoch `e` packs this share's documents in the order `permutation(seed, e)` and visits the
    rows in another seeded permutation (a long document's rows land in different batches).
    With several sources or long-document repeats, the epoch's documents are drawn first
    (`ringformer.data.mixture.Plan`). Without `shuffle`, documents and rows stay in file
    order. Batches may straddle epochs.
    """

    def __init__(self, config_data, tokenizer: Tokenizer, mesh: Mesh | None, *, seed: int,
                 layout: str = "contiguous", shuffle: bool = True, state: dict | None = None,
                 files: str | Sequence[str] | None = None, process_index: int | None = None,
                 process_count: int | None = None,
                 _share: tuple[list[np.ndarray], int] | None = None, _opened=None):
        specs = mixture.train_sources(config_data) if files is None else \
            [mixture.SourceSpec(files, 1.0, *mixture.parse_upsample(
                config_data.get("upsample_long", "") or ""))]
        super().__init__(specs, config_data, tokenizer, mesh, layout=layout,
                         process_index=process_index, process_count=process_count,
                         filters=True, share=_share, opened=_opened)
        self._siblings = [TrainIterator(config_data, tokenizer, mesh, seed=seed, layout=layout,
                                        shuffle=shuffle, files=files,
                                        _share=(self.share_rows, k), _opened=self.opened)
                          for k in self.other_shares]
        self.seed, self.shuffle = int(seed), shuffle
        self.batches = 0  # batches consumed: the one number every share agrees on
        self.plan = mixture.Plan(specs, self.source, self.docs.length, self.seed, self.share)
        # Plain documents fill the same number of rows in any order: the token count is fixed.
        self.fixed = self.plan.plain and self.docs.prompt is None
        n_tokens = int(self.docs.length.sum()) + self.n_docs
        self.rows_per_epoch = max(1, -(-n_tokens // (self.seq_len + 1)))
        self._starts = [0]  # variable epochs: the first row of epoch 0, 1, ... (grown lazily)
        self._epoch_cache: tuple[int, Packer, np.ndarray] | None = None
        if state is not None:
            self.restore(state)

    def _epoch(self, epoch: int) -> tuple[Packer, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, epoch, self.share])  # seeds >= 0
            if self.plan.plain:
                order = _narrow(rng.permutation(self.n_docs)) if self.shuffle else None
            else:
                docs = self.plan.documents(epoch)
                order = _narrow(docs[rng.permutation(len(docs))] if self.shuffle
                                else np.sort(docs))
            self._epoch_cache = None  # the last epoch's arrays go before the next one's come
            # Fixed epochs know their row count: the visit order (and numpy's int64 copy of
            # it) is drawn before the packer's offsets exist, so the two peaks do not add up.
            n_rows = self.rows_per_epoch if self.fixed else None
            visit = _visit(rng, n_rows, self.shuffle) if n_rows else None
            packer = self._packer(order)
            if visit is None:
                visit = _visit(rng, packer.n_rows, self.shuffle)
            self._epoch_cache = (epoch, packer, visit)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row inside it) of this share's `row`-th row since the start."""
        if self.fixed:
            return divmod(row, self.rows_per_epoch)
        while self._starts[-1] <= row:
            self._starts.append(self._starts[-1] + self._epoch(len(self._starts) - 1)[0].n_rows)
        epoch = bisect.bisect_right(self._starts, row) - 1
        return epoch, row - self._starts[epoch]

    def _position(self) -> tuple[int, int]:
        return self._locate(self.batches * self.rows_per_batch)

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
            if seed != self.seed:  # the saved run's order, not ours
                self.seed, self._epoch_cache, self._starts = seed, None, [0]
                self.plan.seed = seed % 2**63
            if "batches" in state:
                batches = int(state["batches"])
            else:  # a state written by hand: epoch and row position of this share
                epoch = int(state["epoch"])
                first = epoch * self.rows_per_epoch if self.fixed else self._first_row(epoch)
                batches = (first + int(state["position"])) // self.rows_per_batch
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"bad data iterator state {state!r}: {e}",
                            "pass the dict returned by TrainIterator.state()") from None
        self.batches = batches
        for s in self._siblings:
            s.restore({"seed": seed, "batches": batches})

    def _first_row(self, epoch: int) -> int:
        while len(self._starts) <= epoch:
            self._locate(self._starts[-1])
        return self._starts[epoch]


class _EvalStream(_Stream):
    def __init__(self, config_data, tokenizer, mesh, *, layout, files, process_index,
                 process_count, _share=None, _opened=None):
        files = config_data.eval_files if files is None else files
        super().__init__([mixture.SourceSpec(files)], config_data, tokenizer, mesh,
                         layout=layout, process_index=process_index,
                         process_count=process_count, filters=False, share=_share,
                         opened=_opened)
        self.packer = self._packer(None)
        rows = self.packer.n_rows
        if _share is not None:
            return  # a sibling: the first share's stream counts batches for all
        self._siblings = [_EvalStream(config_data, tokenizer, mesh, layout=layout, files=files,
                                      process_index=None, process_count=None,
                                      _share=(self.share_rows, k), _opened=self.opened)
                          for k in self.other_shares]
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
