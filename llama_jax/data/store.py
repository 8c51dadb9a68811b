"""Token stores: a corpus tokenized and packed once (`prepare.prepare_store`), read by row.

A store is a directory (local or any `etils.epath` file system, e.g. gs://):

  manifest.json        written last; what the store holds and how it was made (below)
  shard-00000.npy ...  packed rows, `rows_per_shard` rows each (the last may hold fewer)

Each shard is a C-order .npy file (version 1.0 header, no pickles) of one structured record per
row, little-endian, without padding between fields:

  tokens   uint16[T] (uint32 when the vocabulary exceeds 65536 ids); 0 after `length`
  starts   uint8[ceil(T / 8)]: bit j % 8 of byte j // 8 is set where a segment starts at
           column j (a document, or a document's continuation at the start of a row)
  length   uint32: tokens in the row before the padding
  crc32    uint32: CRC-32 of the record's bytes before this field

Segment ids are rebuilt on read as the running count of starts, 0 from `length` on. Storing
the starts costs T/8 bytes a row where per-token segment ids would cost 2T. The per-row CRC lets
a host that reads a few rows of a shard check exactly those; the manifest's sha256 of each whole
shard file is what `prepare_store` checks when it resumes.

manifest.json: `format` ("llama_jax.token_store") and `version`; seq_len, vocab_size,
token_dtype, row_bytes, rows_per_shard; rows, tokens, documents, padding_fraction; pack; the
tokenizer's file and sha256 (`tokenizer_fingerprint`) and the BOS/EOS settings; the inputs with
their sizes; per shard its name, rows, tokens, documents, bytes, data_offset and sha256; and
`settings`, the options that decide the store's bytes (a rerun with other settings must not keep
its shards).

Rows are addressed without an index: row r is record r % rows_per_shard of shard
r // rows_per_shard, so opening a store reads one small JSON file whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
from etils import epath
from etils.epath import backend as epath_backend

from llama_jax.errors import DataError

FORMAT = "llama_jax.token_store"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_PREFIX = "shard-"
# Where prepare_data keeps tokenized documents between its two passes.
SPILL_DIR = ".spill"
# One range read is at most this long; longer runs of adjacent rows are split so that a
# batch's reads spread over the pool.
_MAX_RANGE_BYTES = 32 << 20


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; little-endian."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def row_dtype(seq_len: int, tokens: np.dtype) -> np.dtype:
    """The structured record of one row (see the module docstring)."""
    return np.dtype(
        [
            ("tokens", tokens, (seq_len,)),
            ("starts", "u1", (-(-seq_len // 8),)),
            ("length", "<u4"),
            ("crc32", "<u4"),
        ]
    )


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of a tokenizer file's bytes: what a store records of its tokenizer."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_rows(
    tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """Records of packed rows.

    tokens: int [n, T] (0 after each row's length); starts: bool [n, T], True where a segment
    begins; lengths: int [n]. Returns a structured array [n] of `dtype` with the CRCs set.
    """
    records = np.zeros(len(tokens), dtype)
    records["tokens"] = tokens
    records["starts"] = np.packbits(starts, axis=1, bitorder="little")
    records["length"] = lengths
    raw = records.view(np.uint8).reshape(len(records), dtype.itemsize)
    records["crc32"] = [zlib.crc32(row[:-4]) for row in raw]
    return records


def shard_bytes(records: np.ndarray) -> tuple[bytes, int]:
    """A shard file's bytes (.npy version 1.0) and the offset of its first record."""
    buf = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(records.dtype),
        "fortran_order": False,
        "shape": records.shape,
    }
    np.lib.format.write_array_header_1_0(buf, header)
    offset = buf.tell()
    buf.write(records.tobytes())
    return buf.getvalue(), offset


def decode_rows(
    buf: bytes | memoryview, dtype: np.dtype, where: str, first_row: int
) -> tuple[np.ndarray, np.ndarray]:
    """int32 tokens and segment ids [n, T] of records read back; a record whose CRC fails is a
    DataError naming `where` and its row (`first_row` + its index)."""
    records = np.frombuffer(buf, dtype)
    raw = np.frombuffer(buf, np.uint8).reshape(len(records), dtype.itemsize)
    crcs = records["crc32"]
    for i, row in enumerate(raw):
        if zlib.crc32(row[:-4]) != crcs[i]:
            raise DataError(
                f"{where}: checksum mismatch in row {first_row + i}; the shard is damaged "
                "(rerun launch.prepare_data to rewrite it)"
            )
    seq_len = records["tokens"].shape[1]
    tokens = records["tokens"].astype(np.int32)
    starts = np.unpackbits(records["starts"], axis=1, count=seq_len, bitorder="little")
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    segment_ids[np.arange(seq_len) >= records["length"][:, None].astype(np.int64)] = 0
    return tokens, segment_ids


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str
    rows: int
    tokens: int
    documents: int
    bytes: int
    data_offset: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A store's manifest.json, checked; `raw` is the whole JSON object."""

    seq_len: int
    vocab_size: int
    token_dtype: np.dtype
    rows_per_shard: int
    shards: tuple[Shard, ...]
    tokenizer_sha256: str
    raw: Mapping[str, Any]

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def row_dtype(self) -> np.dtype:
        return row_dtype(self.seq_len, self.token_dtype)

    @property
    def digest(self) -> str:
        """sha256 over the shards' names and checksums, in order: the same exactly when the
        store's rows are."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(f"{shard.name}:{shard.sha256}\n".encode())
        return h.hexdigest()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> Manifest:
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, Mapping) else type(raw).__name__
            raise DataError(f"{where} is not a token store manifest (format {found!r})")
        version = raw.get("version")
        if not _is_int(version) or version < 1:
            raise DataError(f"{where}: version {version!r}; expected an integer >= 1")
        if version > VERSION:
            raise DataError(
                f"{where} is format version {version}, newer than this reader's {VERSION}; "
                "update llama_jax to read it"
            )
        try:
            dtype = np.dtype(raw["token_dtype"])
            shards = tuple(Shard(**s) for s in raw["shards"])
            for key in ("seq_len", "vocab_size", "rows_per_shard"):
                _check_type(raw[key], int, f"{key}")
            for i, shard in enumerate(shards):
                for field in dataclasses.fields(Shard):
                    _check_type(getattr(shard, field.name), field.type, f"shards[{i}].{field.name}")
            manifest = cls(
                seq_len=raw["seq_len"],
                vocab_size=raw["vocab_size"],
                token_dtype=dtype,
                rows_per_shard=raw["rows_per_shard"],
                shards=shards,
                tokenizer_sha256=str(raw["tokenizer"]["sha256"]),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where} is missing or has a malformed entry: {e}") from e
        if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
            raise DataError(f"{where}: token_dtype {dtype}; expected uint16 or uint32")
        if raw.get("row_bytes") != manifest.row_dtype.itemsize:
            raise DataError(
                f"{where}: row_bytes {raw.get('row_bytes')!r} does not match seq_len "
                f"{manifest.seq_len} and {dtype} ({manifest.row_dtype.itemsize})"
            )
        if not shards:
            raise DataError(f"{where} lists no shards")
        for i, shard in enumerate(shards):
            last = i == len(shards) - 1
            if shard.name != shard_name(i) or not (
                0 < shard.rows <= manifest.rows_per_shard
                and (last or shard.rows == manifest.rows_per_shard)
            ):
                raise DataError(
                    f"{where}: shard {i} is {shard.name!r} with {shard.rows} rows; expected "
                    f"{shard_name(i)!r} with {manifest.rows_per_shard} rows (fewer in the last)"
                )
        return manifest

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = epath.Path(directory) / MANIFEST
        if not path.exists():
            raise DataError(f"{directory} is not a token store: it has no {MANIFEST}")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON: {e}") from e
        return cls.from_json(raw, str(path))


def check_not_unfinished(path: str | os.PathLike) -> None:
    """Refuses a directory given as data that is not a token store: an unfinished store (shards
    or prepare_data's spill, no manifest) is named as such."""
    directory = epath.Path(path)
    if not directory.is_dir() or (directory / MANIFEST).exists():
        return
    names = [child.name for child in directory.iterdir()]
    if any(n.startswith(SHARD_PREFIX) or n == SPILL_DIR for n in names):
        raise DataError(
            f"{path} is an unfinished token store: it has shards but no {MANIFEST} "
            "(launch.prepare_data was interrupted, failed or is still running); rerun it with "
            "the same flags to finish the store"
        )
    raise DataError(
        f"{path} is a directory, not a data file or a token store (a store holds a {MANIFEST})"
    )


def _check_type(value: Any, kind: Any, name: str) -> None:
    want = {"int": int, "str": str}.get(kind, kind)
    if not isinstance(value, want) or isinstance(value, bool) or (want is int and value < 0):
        raise TypeError(
            f"{name} is {value!r}; expected a {'non-negative ' * (want is int)}{want.__name__}"
        )


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a manifest.json."""
    path = epath.Path(path)
    return (path / MANIFEST).exists()


class TokenStore:
    """Rows of a store, read by range: `read(rows)` coalesces rows adjacent in a shard into one
    read and runs the reads on `pool` when given. Opening reads the manifest only."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory).rstrip("/")
        self.manifest = Manifest.load(self.directory)
        self._remote = "://" in self.directory
        self._fs = epath_backend.fsspec_backend.fs(self.directory) if self._remote else None

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    def check(
        self,
        *,
        seq_len: int,
        vocab_size: int | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        """Refuses a store that does not fit the run: another seq_len, more token ids than
        `vocab_size`, or another tokenizer file than `tokenizer_path`."""
        m = self.manifest
        if m.seq_len != seq_len:
            raise DataError(
                f"token store {self.directory} holds rows of {m.seq_len} tokens; expected "
                f"seq_len={seq_len} (prepare the corpus again with --seq_len={seq_len})"
            )
        if vocab_size is not None and m.vocab_size > vocab_size:
            raise DataError(
                f"token store {self.directory} was tokenized with a vocabulary of "
                f"{m.vocab_size} ids; the model has {vocab_size}"
            )
        if tokenizer_path is not None:
            fingerprint = tokenizer_fingerprint(tokenizer_path)
            if fingerprint != m.tokenizer_sha256:
                raise DataError(
                    f"token store {self.directory} was made with another tokenizer (sha256 "
                    f"{m.tokenizer_sha256[:12]}...) than {tokenizer_path} ({fingerprint[:12]}...)"
                )

    def read(
        self, rows: Sequence[int] | np.ndarray, pool: Executor | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """int32 tokens and segment ids [n, T] of `rows` (int[n], in [0, num_rows)), in order."""
        return read_rows([(self, rows)], pool)[0]

    def _ranges(self, unique: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(shard, first record, records, index in `unique`) of each read: runs of rows adjacent
        in one shard, cut at `_MAX_RANGE_BYTES`."""
        if not unique.size:
            return []
        per = self.manifest.rows_per_shard
        shard, record = np.divmod(unique, per)
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(record) != 1)) + 1
        longest = max(1, _MAX_RANGE_BYTES // self.manifest.row_dtype.itemsize)
        out = []
        for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(unique)], strict=True):
            for at in range(int(start), int(end), longest):
                count = min(longest, int(end) - at)
                out.append((int(shard[at]), int(record[at]), count, at))
        return out

    def _read_range(self, spec: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        shard_index, first, count, _ = spec
        shard = self.manifest.shards[shard_index]
        dtype = self.manifest.row_dtype
        path = f"{self.directory}/{shard.name}"
        start = shard.data_offset + first * dtype.itemsize
        size = count * dtype.itemsize
        try:
            if self._remote:
                buf = self._fs.cat_file(path, start=start, end=start + size)
            else:
                with open(path, "rb") as f:
                    buf = os.pread(f.fileno(), size, start)
        except FileNotFoundError as e:
            raise DataError(f"shard {path} of the token store is missing") from e
        if len(buf) != size:
            raise DataError(
                f"shard {path} is truncated: {len(buf)} of {size} bytes at offset {start}"
            )
        return decode_rows(buf, dtype, path, shard_index * self.manifest.rows_per_shard + first)


def read_rows(
    requests: Sequence[tuple[TokenStore, Sequence[int] | np.ndarray]],
    pool: Executor | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`TokenStore.read` of several (store, rows) requests, with all their range reads issued
    together on `pool` (in this thread when None)."""
    plans = []
    for token_store, rows in requests:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= token_store.num_rows):
            raise DataError(f"rows outside [0, {token_store.num_rows}) of {token_store.directory}")
        unique, inverse = np.unique(rows, return_inverse=True)
        plans.append((token_store, unique, inverse, token_store._ranges(unique)))
    jobs = [(token_store, r) for token_store, _, _, ranges in plans for r in ranges]
    results = iter(
        (pool.map if pool is not None else map)(lambda job: job[0]._read_range(job[1]), jobs)
    )
    out = []
    for token_store, unique, inverse, ranges in plans:
        seq_len = token_store.seq_len
        tokens = np.empty((len(unique), seq_len), np.int32)
        segment_ids = np.empty((len(unique), seq_len), np.int32)
        for _, _, count, at in ranges:
            tokens[at : at + count], segment_ids[at : at + count] = next(results)
        out.append((tokens[inverse], segment_ids[inverse]))
    return out


def file_sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def padding_fraction(tokens: int, rows: int, seq_len: int) -> float:
    return 0.0 if rows == 0 else 1.0 - tokens / (rows * seq_len)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dims(seq_len: int) -> None:
    if not _is_int(seq_len) or seq_len < 2 or seq_len >= 2**32:
        raise DataError(f"seq_len={seq_len!r}; expected an integer in [2, 2**32)")
    # Row lengths and the per-row CRC are uint32; a row must fit one range read.
    if row_dtype(seq_len, np.dtype("<u4")).itemsize > _MAX_RANGE_BYTES:
        raise DataError(f"seq_len={seq_len} makes rows larger than {_MAX_RANGE_BYTES} bytes")
