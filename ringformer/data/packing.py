"""Packing tokenized documents into fixed rows, with document boundaries kept.

Documents are laid end to end in a chosen order, each followed by EOS, and the stream is cut
into rows of `row_len = seq_len + 1` tokens (the +1 gives every input token its target).
Rows do not overlap, so every token of every document lands in exactly one row; the last row
is padded. Nothing is materialised up front: a row is assembled from the flat token buffer
when asked for, so an epoch with a new document order costs one cumulative sum.

Per row:
- `segment_ids`: 1, 2, ... for the documents in the row, in order; 0 marks padding.
- `positions`: the token's offset inside its document. A document that continues from the
  previous row keeps counting, so RoPE sees the same positions as if it were unsplit.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class Packer:
    """Rows over documents `values[offsets[i]:offsets[i+1]]` taken in `order`.

    `values` holds every document's ids back to back (without EOS); `offsets` has one more
    entry than there are documents.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray, *, row_len: int, eos_id: int,
                 pad_id: int, order: np.ndarray | None = None):
        if row_len < 2:
            raise ValueError(f"row_len={row_len} must be at least 2 (seq_len >= 1)")
        self.values = values
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.row_len, self.eos_id, self.pad_id = row_len, eos_id, pad_id
        n_docs = len(self.offsets) - 1
        self.order = np.arange(n_docs) if order is None else np.asarray(order, dtype=np.int64)
        lengths = (self.offsets[1:] - self.offsets[:-1] + 1)[self.order]  # +1: the EOS
        # bounds[k]: where the k-th document (in packing order) starts in the stream.
        self.bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self.bounds[-1])
        self.n_rows = max(1, -(-self.n_tokens // row_len))

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment_ids, positions) of row `r`, each [row_len] int32."""
        if not 0 <= r < self.n_rows:
            raise IndexError(f"row {r} out of range [0, {self.n_rows})")
        start, stop = r * self.row_len, (r + 1) * self.row_len
        tokens = np.full(self.row_len, self.pad_id, dtype=np.int32)
        segs = np.zeros(self.row_len, dtype=np.int32)
        pos = np.zeros(self.row_len, dtype=np.int32)
        k = int(np.searchsorted(self.bounds, start, side="right")) - 1
        seg = 0
        while k < len(self.order) and self.bounds[k] < stop:
            a, b = max(start, int(self.bounds[k])), min(stop, int(self.bounds[k + 1]))
            doc_from = a - int(self.bounds[k])  # offset inside the document (+EOS)
            d = int(self.order[k])
            lo, hi = int(self.offsets[d]), int(self.offsets[d + 1])
            n_body = max(0, min(hi - lo - doc_from, b - a))  # document tokens in the window
            out = slice(a - start, b - start)
            chunk = tokens[out]
            chunk[:n_body] = self.values[lo + doc_from: lo + doc_from + n_body]
            chunk[n_body:] = self.eos_id  # only ever the single EOS at the document's end
            seg += 1
            segs[out] = seg
            pos[out] = np.arange(doc_from, doc_from + (b - a), dtype=np.int32)
            k += 1
        return tokens, segs, pos

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked rows; an index of -1 gives an all-padding row (segment 0, masked out)."""
        out = [self.row(int(i)) if i >= 0 else self._pad_row() for i in indices]
        return tuple(np.stack(col) for col in zip(*out, strict=True))

    def _pad_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = np.zeros(self.row_len, dtype=np.int32)
        return np.full(self.row_len, self.pad_id, dtype=np.int32), z, z.copy()


def to_batch(tokens: np.ndarray, segs: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Rows [b, seq_len + 1] -> model inputs [b, seq_len].

    `loss_mask` is 1 where the target is the next token of the same document as the input:
    0 across a document boundary (EOS -> next document's first token) and on padding.
    """
    same_doc = (segs[:, 1:] == segs[:, :-1]) & (segs[:, :-1] > 0)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segs[:, :-1],
        "positions": pos[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }
