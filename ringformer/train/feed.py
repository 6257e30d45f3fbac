"""Batches packed and placed on the devices ahead of the step that needs them.

Packing a batch is host work (numpy, the layout permutation, `device_put`); done between two
steps it leaves the device idle for that long. `Prefetcher` does it on a background thread,
a few batches ahead, so the next step can be dispatched as soon as the previous one is.

The data iterator runs ahead of training, so its own `state()` is the position of the last
*prefetched* batch. A checkpoint must hold the position after the last *consumed* batch (a
resumed run continues with the batch the next step would have taken), so each batch travels
with the iterator's state taken just after it was made, and `consumed_state` is the state
that goes with the last batch handed out.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


class Prefetcher:
    """`next(feed)` -> the next batch of `source`, made up to `depth` batches ahead.

    `depth=0` makes each batch on demand in the caller's thread (the synchronous path, kept
    as the reference the prefetched one is tested against). Errors raised by the source
    (bad data) are raised by `next` in the caller's thread, at the batch they belong to.
    """

    def __init__(self, source: Iterator[Any], depth: int = 2):
        self._source, self._depth = source, depth
        self.consumed_state: dict = dict(source.state())
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            # A daemon: a run that dies with an exception must not wait for the producer.
            self._thread = threading.Thread(target=self._produce, name="batch-prefetch",
                                            daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = (next(self._source), dict(self._source.state()))
            except BaseException as e:  # handed to the consumer, raised at its batch
                item = (_DONE, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is _DONE:
                return

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            batch, state = next(self._source), dict(self._source.state())
        else:
            batch, state = self._queue.get()
            if batch is _DONE:
                self._queue.put((batch, state))  # every later call raises it too
                raise state
        self.consumed_state = state
        return batch

    def close(self) -> None:
        """Stop the producer; the batches it made ahead are dropped (they were not trained on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
