"""Batches drawn from token stores by weight: which rows make up global batch k, from
(seed, k) alone.

Batch k gives source i n_i(k) of its B rows: with the cumulative weights C_0 = 0 < C_1 < ... <
C_m = 1 and u_k in [0, 1) hashed from (seed, k), the boundaries b_i = floor(C_i * B + u_k)
(b_0 = 0, b_m = B) make n_i = b_(i+1) - b_i either floor(w_i * B) or ceil(w_i * B), so every
batch holds each source's share to within one row and its expectation exactly. The B slots are
dealt to the sources in a keyed random order of the batch (so each host's rows mix the sources
like the batch does), and a source's rows continue its own endless sequence of epoch
permutations (`permute.EpochOrder`, one stream per source) from where the batches before k left
it: rows before batch k are the sum of n_i over the earlier batches, computed in vectorized
chunks and cached, so resuming at step k costs O(k) arithmetic and no reads.

One store with weight 1 is the plain case: batch k holds positions [k*B, (k+1)*B) of its order.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from llama_jax.data import store
from llama_jax.data.permute import EpochOrder, mix64, permute
from llama_jax.errors import DataError

_CHUNK_STEPS = 1 << 16
_SLOT_KEYS = 6


def parse_sources(spec) -> tuple[tuple[str, float], ...]:
    """(path, weight) pairs of a mixture: "PATH:W,PATH:W" (the weight after the last colon, so
    gs:// paths work), a list of such strings, or a list of {"path", "weight"} mappings or
    (path, weight) pairs. Empty: (). Weights must be >= 0 and not all 0."""
    if spec is None or spec == "" or (isinstance(spec, Sequence) and not spec):
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            path, sep, weight = item.strip().rpartition(":")
            if not sep or not path or "/" in weight:
                raise DataError(f"data source {item!r}; expected PATH:WEIGHT")
            try:
                value = float(weight)
            except ValueError as e:
                raise DataError(f"data source {item!r}: weight {weight!r} is not a number") from e
        elif isinstance(item, Mapping) and set(item) == {"path", "weight"}:
            path, value = item["path"], item["weight"]
        elif isinstance(item, Sequence) and len(item) == 2:
            path, value = item
        else:
            raise DataError(
                f"data source {item!r}; expected 'PATH:WEIGHT', {{'path', 'weight'}} or a pair"
            )
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not 0 <= value < math.inf
        ):
            raise DataError(
                f"data source {path!r} has weight {value!r}; expected a finite number >= 0"
            )
        out.append((str(path), float(value)))
    if not any(w > 0 for _, w in out):
        raise DataError(f"data sources {out}: every weight is 0; give at least one a weight > 0")
    if not math.isfinite(sum(w for _, w in out)):
        raise DataError(f"data sources {out}: the weights' sum overflows; scale them down")
    return tuple(out)


class Mixture:
    """Rows of global batches drawn from `stores` by `weights` (see the module docstring)."""

    def __init__(
        self,
        stores: Sequence[store.TokenStore],
        weights: Sequence[float],
        seed: int,
        global_batch: int,
    ):
        if len(stores) != len(weights) or not stores:
            raise DataError(f"{len(stores)} stores and {len(weights)} weights")
        fingerprints = {s.manifest.tokenizer_sha256 for s in stores}
        if len(fingerprints) > 1:
            names = [f"{s.directory} ({s.manifest.tokenizer_sha256[:12]}...)" for s in stores]
            raise DataError(f"the data sources were made with different tokenizers: {names}")
        total = float(sum(weights))
        self.stores = tuple(stores)
        self.weights = np.array(weights, np.float64) / total
        self._cumulative = np.cumsum(self.weights)[:-1]
        self._batch = global_batch
        self._seed_key = _key(seed, 0x313C)
        self._slot_keys = np.random.default_rng((seed, 0x51075)).integers(
            0, 2**64, size=_SLOT_KEYS, dtype=np.uint64
        )
        self._orders = [EpochOrder(s.num_rows, seed, stream=i) for i, s in enumerate(stores)]
        self._lock = threading.Lock()
        self._done: dict[int, np.ndarray] = {0: np.zeros(len(stores), np.int64)}

    def counts(self, steps: np.ndarray) -> np.ndarray:
        """int64 [len(steps), m]: rows of each source in each batch of `steps`."""
        steps = np.asarray(steps, dtype=np.uint64)
        m, b = len(self.stores), self._batch
        if m == 1:
            return np.full((len(steps), 1), b, np.int64)
        u = (mix64(steps ^ self._seed_key) >> np.uint64(11)).astype(np.float64) / 2.0**53
        inner = np.floor(self._cumulative[None, :] * b + u[:, None]).astype(np.int64)
        edge = np.zeros((len(steps), 1), np.int64)
        bounds = np.concatenate([edge, np.clip(inner, 0, b), edge + b], axis=1)
        return np.diff(bounds, axis=1)

    def consumed(self, step: int) -> np.ndarray:
        """int64 [m]: each source's rows in the batches before `step`."""
        if len(self.stores) == 1:
            return np.array([step * self._batch], np.int64)
        with self._lock:
            start = max(s for s in self._done if s <= step)
            total = self._done[start].copy()
            while start < step:
                end = min(step, start + _CHUNK_STEPS)
                total += self.counts(np.arange(start, end)).sum(axis=0)
                start = end
            if len(self._done) >= 8:
                self._done.pop(min(s for s in self._done if s != 0))
            self._done[step] = total.copy()
            return total

    def locate(self, step: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source (int [n]) and its row (int64 [n]) at batch `step`'s `slots` (int [n])."""
        slots = np.asarray(slots, dtype=np.int64)
        counts = self.counts(np.array([step]))[0]
        if len(self.stores) == 1:
            rank = slots
        else:
            # The slot's place in a keyed shuffle of the batch decides its source.
            keys = mix64(self._slot_keys ^ mix64(np.uint64(step)))
            rank = permute(slots, self._batch, keys)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        source = np.searchsorted(bounds, rank, side="right") - 1
        position = self.consumed(step)[source] + rank - bounds[source]
        rows = np.empty_like(position)
        for i in np.unique(source):
            at = source == i
            rows[at] = self._orders[i].rows(position[at])
        return source, rows

    def read(
        self, step: int, slots: np.ndarray, pool: Executor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """int32 tokens and segment ids [n, T] of batch `step`'s `slots`, all sources' reads
        issued together on `pool`."""
        source, rows = self.locate(step, slots)
        present = np.unique(source)
        parts = store.read_rows([(self.stores[i], rows[source == i]) for i in present], pool)
        seq_len = self.stores[0].seq_len
        tokens = np.empty((len(slots), seq_len), np.int32)
        segment_ids = np.empty((len(slots), seq_len), np.int32)
        for i, (tok, seg) in zip(present, parts, strict=True):
            tokens[source == i], segment_ids[source == i] = tok, seg
        return tokens, segment_ids


def _key(seed: int, salt: int) -> np.uint64:
    mixed = mix64(np.array([seed, salt], np.uint64))
    return mixed[0] ^ mixed[1]
