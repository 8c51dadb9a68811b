"""Batches made ahead of use: while step k is consumed, steps k+1 .. k+depth are made on
background threads, so their reads are in flight before anyone asks for them.

Batches are keyed by step (a batch is a function of its step alone), so jumping to another step
(`DataIterator.restore`) simply drops what no longer lies ahead. An error while making a batch
is raised by `get` of that step, in the caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """`get(step)` returns `make(step)`, computed ahead when the previous steps were asked for.

    depth: batches made ahead of the one being consumed (0: each is made when asked for).
    """

    def __init__(self, make: Callable[[int], T], depth: int):
        self._make = make
        self._depth = depth
        self._lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._pool = (
            ThreadPoolExecutor(max_workers=depth + 1, thread_name_prefix="data-prefetch")
            if depth
            else None
        )

    @property
    def depth(self) -> int:
        return self._depth

    def get(self, step: int) -> T:
        if self._pool is None:
            return self._make(step)
        with self._lock:
            future = self._futures.pop(step, None)
            if future is None:
                future = self._pool.submit(self._make, step)
            for other in [s for s in self._futures if not step < s <= step + self._depth]:
                self._futures.pop(other).cancel()
            for ahead in range(step + 1, step + self._depth + 1):
                if ahead not in self._futures:
                    self._futures[ahead] = self._pool.submit(self._make, ahead)
        return future.result()

    def pending(self) -> list[int]:
        """The steps being made or ready, ahead of the last one asked for."""
        with self._lock:
            return sorted(self._futures)

    def close(self) -> None:
        """Drops the batches made ahead; the threads exit once their current batch is done."""
        if self._pool is None:
            return
        with self._lock:
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
