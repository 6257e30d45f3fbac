"""Packing tokenized documents into fixed rows, with document boundaries kept.

Documents are laid end to end in a chosen order, each followed by EOS, and the stream is cut
into rows of `row_len = seq_len + 1` tokens (the +1 gives every input token its target).
Rows do not overlap, so every token of every document lands in exactly one row; the last row
is padded. Nothing is materialised up front: a row is assembled from the token store (an
in-memory array or the memory-mapped cache) when asked for, so an epoch with a new document
order costs one cumulative sum.

Per row:
- `segment_ids`: 1, 2, ... for the documents in the row, in order; 0 marks padding.
- `positions`: the token's offset inside its document. A document that continues from the
  previous row keeps counting, so RoPE sees the same positions as if it were unsplit.

Supervised examples (`Docs.prompt` > 0) carry no loss on their first `prompt` tokens, and
are kept whole: one that does not fit in what is left of a row starts the next row (the gap
is padding). Only an example longer than a whole row is split, like any long document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclass(frozen=True)
class Docs:
    """Document `d` is `shards[shard[d]][start[d]:start[d] + length[d]]` (EOS not stored);
    its first `prompt[d]` tokens are the prompt of a supervised example (0: a document)."""

    shards: list
    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    prompt: np.ndarray | None = None

    @classmethod
    def from_offsets(cls, values: np.ndarray, offsets: np.ndarray) -> Docs:
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        return cls([values], np.zeros(n, np.int32), offsets[:-1], offsets[1:] - offsets[:-1])

    def __len__(self) -> int:
        return len(self.start)

    def read(self, d: int, lo: int, n: int) -> np.ndarray:
        s = int(self.start[d]) + lo
        return self.shards[int(self.shard[d])][s:s + n]


def _whole_starts(lengths: np.ndarray, whole: np.ndarray, row_len: int) -> np.ndarray:
    """Stream offsets when the `whole` documents may not straddle a row boundary."""
    starts = np.empty(len(lengths), np.int64)
    pos = 0
    for k, (n, w) in enumerate(zip(lengths.tolist(), whole.tolist(), strict=True)):
        used = pos % row_len
        if w and used and used + n > row_len and n <= row_len:
            pos += row_len - used
        starts[k] = pos
        pos += n
    return starts


def _stream_starts(length: np.ndarray, order: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """Stream offsets of the documents `order` without gaps: the cumulative sum of their
    lengths (+1 each: the EOS), built in place with only a block of temporaries."""
    starts = np.zeros(len(order), np.int64)
    for a in range(0, len(order) - 1, block):
        b = min(len(order) - 1, a + block)
        starts[a + 1:b + 1] = length[order[a:b]]
    starts[1:] += 1
    np.cumsum(starts, out=starts)
    return starts


class Packer:
    """Rows over documents taken in `order` (repeats allowed).

    `docs` is a `Docs`, or (legacy) a flat `values` array with `offsets` (one more entry than
    there are documents).
    """

    def __init__(self, docs, offsets=None, *, row_len: int, eos_id: int, pad_id: int,
                 order: np.ndarray | None = None):
        if row_len < 2:
            raise ValueError(f"row_len={row_len} must be at least 2 (seq_len >= 1)")
        self.docs = docs if offsets is None else Docs.from_offsets(docs, offsets)
        self.row_len, self.eos_id, self.pad_id = row_len, eos_id, pad_id
        n_docs = len(self.docs)
        # Any integer dtype (the iterator passes int32): widening would double its memory.
        self.order = np.arange(n_docs) if order is None else np.asarray(order)
        if self.order.dtype.kind not in "iu":
            self.order = self.order.astype(np.int64)
        prompt = self.docs.prompt
        whole = None if prompt is None else prompt[self.order] > 0
        if whole is not None and whole.any():
            lengths = self.docs.length[self.order].astype(np.int64) + 1  # +1: the EOS
            self.starts = _whole_starts(lengths, whole, row_len)
        else:  # every document streams: one cumulative sum
            self.starts = _stream_starts(self.docs.length, self.order)
        self.n_tokens = self._end(len(self.order) - 1) if len(self.order) else 0
        self.n_rows = max(1, -(-self.n_tokens // row_len))

    def _end(self, k: int) -> int:
        """Where the `k`-th document of the order ends in the stream, after its EOS (computed,
        not stored: one int64 a document less)."""
        return int(self.starts[k]) + int(self.docs.length[int(self.order[k])]) + 1

    def row(self, r: int) -> tuple[np.ndarray, ...]:
        """(tokens, segment_ids, positions, trainable) of row `r`, each [row_len]; `trainable`
        is False on prompt tokens (never a target) and padding."""
        if not 0 <= r < self.n_rows:
            raise IndexError(f"row {r} out of range [0, {self.n_rows})")
        start, stop = r * self.row_len, (r + 1) * self.row_len
        tokens = np.full(self.row_len, self.pad_id, dtype=np.int32)
        segs = np.zeros(self.row_len, dtype=np.int32)
        pos = np.zeros(self.row_len, dtype=np.int32)
        train = np.zeros(self.row_len, dtype=bool)
        k = max(0, int(np.searchsorted(self.starts, start, side="right")) - 1)
        seg = 0
        while k < len(self.order) and self.starts[k] < stop:
            a, b = max(start, int(self.starts[k])), min(stop, self._end(k))
            if a >= b:  # a document before this row, or one that ended in a gap
                k += 1
                continue
            doc_from = a - int(self.starts[k])  # offset inside the document (+EOS)
            d = int(self.order[k])
            n_body = max(0, min(int(self.docs.length[d]) - doc_from, b - a))
            out = slice(a - start, b - start)
            chunk = tokens[out]
            chunk[:n_body] = self.docs.read(d, doc_from, n_body)
            chunk[n_body:] = self.eos_id  # only ever the single EOS at the document's end
            seg += 1
            segs[out] = seg
            pos[out] = np.arange(doc_from, doc_from + (b - a), dtype=np.int32)
            no_loss = 0 if self.docs.prompt is None else int(self.docs.prompt[d])
            train[out] = pos[out] >= no_loss
            k += 1
        return tokens, segs, pos, train

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked (tokens, segment_ids, positions); an index of -1 gives an all-padding row
        (segment 0, masked out)."""
        return self._stack(indices)[:3]

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Model inputs of the rows `indices` (see `to_batch`)."""
        return to_batch(*self._stack(indices))

    def _stack(self, indices) -> tuple[np.ndarray, ...]:
        out = [self.row(int(i)) if i >= 0 else self._pad_row() for i in indices]
        return tuple(np.stack(col) for col in zip(*out, strict=True))

    def _pad_row(self) -> tuple[np.ndarray, ...]:
        z = np.zeros(self.row_len, dtype=np.int32)
        return (np.full(self.row_len, self.pad_id, dtype=np.int32), z, z.copy(),
                np.zeros(self.row_len, dtype=bool))


def to_batch(tokens: np.ndarray, segs: np.ndarray, pos: np.ndarray,
             trainable: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Rows [b, seq_len + 1] -> model inputs [b, seq_len].

    `loss_mask` is 1 where the target is the next token of the same document as the input:
    0 across a document boundary (EOS -> next document's first token), on padding, and where
    the target is not `trainable` (a supervised example's prompt).
    """
    same_doc = (segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)
    if trainable is not None:
        same_doc &= trainable[:, 1:]
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segs[:, :-1],
        "positions": pos[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }
