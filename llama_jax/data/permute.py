"""Keyed permutations computed one index at a time, so a row order over any number of rows
costs no memory: `EpochOrder` gives the source row at each position of an endless sequence of
per-epoch permutations, and `mix64` hashes integers (documents to shuffle buckets).

A permutation of [0, n) is a Feistel network over the smallest even number of bits that covers
n, with cycle walking: an index whose image falls at or above n is permuted again until it
lands below n. Each step is a bijection of the power-of-two domain, so the walk ends and the
result is a bijection of [0, n). The round function is the splitmix64 finaliser of the right
half xor a round key; the keys come from `np.random.default_rng((seed, stream, epoch))`.
"""

from __future__ import annotations

import threading

import numpy as np

_ROUNDS = 6
# splitmix64's finaliser constants (Steele, Lea and Flood 2014).
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64[*] -> uint64[*]."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of `index` (int[*], each in [0, n)) under the permutation of [0, n) that
    `keys` (uint64[rounds]) select. Returns int64[*]."""
    index = np.asarray(index, dtype=np.int64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    x = index.astype(np.uint64)
    todo = np.ones(x.shape, bool)
    while todo.any():
        left, right = x[todo] >> shift, x[todo] & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        x[todo] = (left << shift) | right
        todo[todo] = x[todo] >= np.uint64(n)
    return x.astype(np.int64)


class EpochOrder:
    """Position p of an endless sequence -> the row it reads: epoch e = p // n visits all n
    rows in the permutation keyed by (seed, stream, e). `stream` keeps the orders of several
    row sets (the sources of a mixture) independent under one seed."""

    def __init__(self, num_rows: int, seed: int, stream: int = 0):
        self.num_rows = num_rows
        self._seed = seed
        self._stream = stream
        self._keys: dict[int, np.ndarray] = {}
        # Prefetch threads ask for rows concurrently.
        self._lock = threading.Lock()

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """int64[*] rows of int[*] positions (>= 0)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_rows)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = permute(offsets[at], self.num_rows, self._epoch_keys(int(epoch)))
        return out

    def _epoch_keys(self, epoch: int) -> np.ndarray:
        with self._lock:
            keys = self._keys.get(epoch)
            if keys is None:
                if len(self._keys) >= 4:
                    self._keys.pop(next(iter(self._keys)))
                rng = np.random.default_rng((self._seed, self._stream, epoch))
                keys = rng.integers(0, 2**64, size=_ROUNDS, dtype=np.uint64)
                self._keys[epoch] = keys
            return keys
