"""Packing documents into rows of exactly T tokens, streamed: documents go in a list at a
time and completed rows come out, so memory holds the open rows only.

  concat    documents run on back to back and are cut every T tokens: a document that does not
            fit continues as a new segment at the start of the next row. Only the last row is
            padded.
  best_fit  each document goes whole into the open row with the least room that still fits it
            (ties: the older row); a document longer than T is first cut into T-token rows, and
            its remainder is placed like a document. At most `open_rows` rows stay open: when a
            piece fits none and that many are open, the fullest open row is closed (padded).
            Closed and filled rows come out in the order they complete.

Every piece of a document is its own segment of its row.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from llama_jax.errors import DataError

PACK_MODES = ("concat", "best_fit")
# Open rows best_fit keeps: enough for its padding to settle near its floor on long-tailed
# document lengths (bench/data.py), while a row is closed at most this many rows late.
BEST_FIT_OPEN_ROWS = 256


@dataclasses.dataclass
class Rows:
    """Packed rows: tokens int [n, T] (0 as padding), starts bool [n, T] (a segment begins),
    lengths int64 [n] (tokens before the padding), documents int64 [n] (documents whose first
    token is in the row)."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    documents: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def packer(mode: str, seq_len: int, dtype: np.dtype, open_rows: int = BEST_FIT_OPEN_ROWS):
    """A `ConcatPacker` or `BestFitPacker` for rows of `seq_len` tokens of `dtype`."""
    if mode == "concat":
        return ConcatPacker(seq_len, dtype)
    if mode == "best_fit":
        return BestFitPacker(seq_len, dtype, open_rows)
    raise DataError(f"pack mode {mode!r} is unknown; expected one of {PACK_MODES}")


class ConcatPacker:
    def __init__(self, seq_len: int, dtype: np.dtype):
        self._seq_len = seq_len
        self._dtype = dtype
        self._carry = np.zeros(0, dtype)
        self._carry_doc = np.zeros(0, bool)  # True where a document starts

    def add(self, docs: Sequence[np.ndarray]) -> Rows:
        """Rows completed by `docs` (each int[length], empty ones ignored)."""
        docs = [d for d in docs if len(d)]
        lengths = np.array([len(d) for d in docs], np.int64)
        stream = np.concatenate([self._carry, *docs]).astype(self._dtype, copy=False)
        doc_start = np.zeros(len(stream), bool)
        doc_start[: len(self._carry)] = self._carry_doc
        doc_start[len(self._carry) + np.cumsum(lengths) - lengths] = True
        t = self._seq_len
        full = len(stream) // t * t
        self._carry, self._carry_doc = stream[full:].copy(), doc_start[full:].copy()
        return self._rows(stream[:full], doc_start[:full])

    def finish(self) -> Rows:
        """The last, padded row (none if nothing is left)."""
        t, n = self._seq_len, len(self._carry)
        stream = np.zeros(-(-n // t) * t, self._dtype)
        stream[:n] = self._carry
        doc_start = np.zeros(len(stream), bool)
        doc_start[:n] = self._carry_doc
        self._carry = self._carry[:0]
        self._carry_doc = self._carry_doc[:0]
        rows = self._rows(stream, doc_start)
        if len(rows):
            rows.lengths[-1] = n - (len(rows) - 1) * t
        return rows

    def _rows(self, stream: np.ndarray, doc_start: np.ndarray) -> Rows:
        t = self._seq_len
        tokens = stream.reshape(-1, t)
        doc_start = doc_start.reshape(-1, t)
        starts = doc_start.copy()
        # A document running on from the previous row is a new segment of this one.
        starts[:, 0] = True
        return Rows(
            tokens,
            starts,
            np.full(len(tokens), t, np.int64),
            doc_start.sum(axis=1, dtype=np.int64),
        )


class BestFitPacker:
    def __init__(self, seq_len: int, dtype: np.dtype, open_rows: int = BEST_FIT_OPEN_ROWS):
        if open_rows < 1:
            raise DataError(f"open_rows={open_rows}; expected >= 1")
        self._seq_len = seq_len
        self._dtype = dtype
        self._limit = open_rows
        self._rooms: list[tuple[int, int]] = []  # (room left, row id), sorted
        self._open: dict[int, list[tuple[np.ndarray, bool]]] = {}  # row id -> pieces
        self._next_id = 0

    def add(self, docs: Sequence[np.ndarray]) -> Rows:
        """Rows completed (filled, or closed to make room) while placing `docs`."""
        t = self._seq_len
        done: list[list[tuple[np.ndarray, bool]]] = []
        for doc in docs:
            whole, rest = divmod(len(doc), t)
            for k in range(whole):
                done.append([(doc[k * t : (k + 1) * t], k == 0)])
            if rest:
                self._place(doc[whole * t :], whole == 0, done)
        return self._rows(done)

    def finish(self) -> Rows:
        """The rows still open, oldest first."""
        rows = [self._open[i] for i in sorted(self._open)]
        self._open.clear()
        self._rooms.clear()
        return self._rows(rows)

    def _place(self, piece: np.ndarray, first: bool, done: list) -> None:
        size = len(piece)
        at = bisect.bisect_left(self._rooms, (size, -1))
        if at < len(self._rooms):
            room, row = self._rooms.pop(at)
            self._open[row].append((piece, first))
            if room == size:
                done.append(self._open.pop(row))
            else:
                bisect.insort(self._rooms, (room - size, row))
            return
        if len(self._rooms) >= self._limit:
            _, row = self._rooms.pop(0)
            done.append(self._open.pop(row))
        row, self._next_id = self._next_id, self._next_id + 1
        self._open[row] = [(piece, first)]
        bisect.insort(self._rooms, (self._seq_len - size, row))

    def _rows(self, rows: list[list[tuple[np.ndarray, bool]]]) -> Rows:
        t = self._seq_len
        tokens = np.zeros((len(rows), t), self._dtype)
        starts = np.zeros((len(rows), t), bool)
        lengths = np.zeros(len(rows), np.int64)
        documents = np.zeros(len(rows), np.int64)
        for i, pieces in enumerate(rows):
            at = 0
            for piece, first in pieces:
                tokens[i, at : at + len(piece)] = piece
                starts[i, at] = True
                at += len(piece)
                documents[i] += first
            lengths[i] = at
        return Rows(tokens, starts, lengths, documents)
