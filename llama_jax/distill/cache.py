"""A teacher's top-k token distribution stored once on disk, and read back per batch.

A cache holds, for every position of every row of the first N global batches of a
distillation config's data (in the data iterator's order: batch `step` is a function
of the seed and `step`), the teacher's top-k record (`logit_records`: the k most likely
token ids, their log-probabilities at temperature 1, the log of the tail's mass):

    <dir>/metadata.json                          format, layout, data, teacher, parts
    <dir>/shards/s<first step:08d>.p<part:04d>.npy

Parts and shards: the rows of a global batch are split into parts, one per process of
the run that wrote the cache: a process's part is the rows its devices hold (a row held
by several processes belongs to the lowest). The metadata lists each part's rows in
increasing order. A shard is one part's rows for `steps_per_shard` consecutive steps
(fewer in the last shard): a .npy structured array [steps, rows of the part] with
fields `tokens_crc32` (uint32, the CRC-32 of the row's int32 little-endian tokens, so
a reader can tell the cache belongs to its data), `records_crc32` (uint32, the CRC-32
of the row's records, so a reader can tell a damaged file) and `records` (uint8[T, R]). Shards
and the metadata are written under a temporary name and renamed when complete.

Any process of any later run reads any rows: `LogitCache.read(step, rows)`, or
`CachedBatches` beside a `data.DataIterator`.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import weakref
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from llama_jax import data, formats
from llama_jax.distill.records import Layout
from llama_jax.errors import CheckpointError, ConfigError, DataError

FORMAT = "llama_jax.logit_cache"
# 2: each row also carries the CRC-32 of its records, so a damaged shard is named.
FORMAT_VERSION = 2
METADATA = "metadata.json"
SHARDS = "shards"
# The batch field `CachedBatches` adds: the teacher's records of the batch's rows.
RECORDS = "teacher_records"

# The data settings that decide which tokens batch `step` holds.
DATA_KEYS = ("path", "format", "field", "seq_len", "global_batch", "seed", "add_bos", "add_eos")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- rows, processes and shardings ------------------------------------------------------------


def row_parts(records_sharding: Sharding, shape: tuple[int, int, int]) -> list[list[int]]:
    """For each process, the rows of uint8[B, T, R] records it writes: those its devices
    hold under `records_sharding`, a row held by several processes going to the lowest."""
    owner: dict[int, int] = {}
    for device, index in records_sharding.devices_indices_map(shape).items():
        for row in range(*index[0].indices(shape[0])):
            owner[row] = min(owner.get(row, device.process_index), device.process_index)
    parts: list[list[int]] = [[] for _ in range(jax.process_count())]
    for row in sorted(owner):
        parts[owner[row]].append(row)
    return parts


def local_rows(batch_sharding: Sharding, shape: tuple[int, int]) -> np.ndarray:
    """The rows this process's devices hold of a [B, T] batch, in increasing order: the
    rows, and their order, of `DataIterator.local_batch`."""
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def records_sharding(batch_sharding: NamedSharding, *, whole_rows: bool = False) -> NamedSharding:
    """The sharding of uint8[B, T, R] records that matches a [B, T] batch sharding;
    whole_rows: split over the batch dimension only, so each device holds whole rows."""
    spec = tuple(batch_sharding.spec) + (None,) * (2 - len(batch_sharding.spec))
    if whole_rows:
        spec = spec[:1] + (None,)
    return NamedSharding(batch_sharding.mesh, PartitionSpec(*spec, None))


def tokens_crc32(tokens_bT: np.ndarray) -> np.ndarray:
    """uint32[b]: the CRC-32 of each row of int[b, T] tokens, taken as int32 little-endian."""
    rows = np.ascontiguousarray(tokens_bT, dtype="<i4")
    return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)


# ---- metadata ----------------------------------------------------------------------------------


def norm_path(path: str) -> str:
    """A local path made absolute (runs may start elsewhere); a URL as it is."""
    return path if "://" in path else os.path.abspath(path)


def data_settings(config: data.DataConfig) -> dict[str, Any]:
    """What a cache records about its data: the settings that decide each batch's
    tokens (`DATA_KEYS`, the path made absolute), the data file's size, and for token stores
    the mixture's sources and each store's digest (`data.TokenStore.manifest.digest`)."""
    out = {k: getattr(config, k) for k in DATA_KEYS}
    out["path"] = norm_path(config.path) if config.path else ""
    out["sources"] = [[norm_path(p), w] for p, w in config.sources]
    out["bytes"] = out["stores"] = None
    if config.format == "store":
        specs = [p for p, _ in config.sources] or [config.path]
        out["stores"] = [data.TokenStore(p).manifest.digest for p in specs]
    else:
        path = epath.Path(out["path"])
        out["bytes"] = path.stat().length if path.exists() else None
    return out


def shard_dtype(seq_len: int, record_bytes: int) -> np.dtype:
    return np.dtype(
        [
            ("tokens_crc32", "<u4"),
            ("records_crc32", "<u4"),
            ("records", "u1", (seq_len, record_bytes)),
        ]
    )


def records_crc32(records: np.ndarray) -> np.ndarray:
    """uint32[...]: the CRC-32 of each row of records uint8[..., T, R]."""
    rows = np.ascontiguousarray(records).reshape(-1, *records.shape[-2:])
    out = np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)
    return out.reshape(records.shape[:-2])


def shard_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """The .npy (version 1.0) header of a shard of this shape and dtype."""
    buf = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def write_json(path: epath.Path, obj: Mapping[str, Any]) -> None:
    """Writes JSON under a temporary name and renames it: readers never see half a file."""
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


def read_metadata(directory) -> dict[str, Any]:
    """The metadata of the cache in `directory`, its format and version checked."""
    path = epath.Path(directory) / METADATA
    if not path.exists():
        raise CheckpointError(
            f"{directory} has no {METADATA}; expected a teacher logit cache written by "
            "python -m launch.teacher_logits"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a teacher logit cache's metadata (format {FORMAT})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {meta.get('version')!r}; this reader reads version "
            f"{FORMAT_VERSION}. Write the cache again."
        )
    return meta


class LogitCache:
    """A cache directory opened for reading; the metadata checked, no shard read yet.

    layout: the records' `Layout`; steps: global batches cached; seq_len, global_batch:
    T and B of the data; meta: the metadata as written.
    """

    def __init__(self, directory):
        self.directory = epath.Path(norm_path(os.fspath(directory)))
        self.meta = read_metadata(self.directory)
        try:
            self.layout = Layout.from_json(self.meta["layout"])
            self.steps = int(self.meta["steps"])
            self.steps_per_shard = int(self.meta["steps_per_shard"])
            self.seq_len = int(self.meta["data"]["seq_len"])
            self.global_batch = int(self.meta["data"]["global_batch"])
            parts = [list(map(int, p)) for p in self.meta["parts"]]
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{self.directory / METADATA} is damaged: {e!r}") from e
        self.parts = parts
        self._where = {row: (p, j) for p, rows in enumerate(parts) for j, row in enumerate(rows)}
        if sorted(self._where) != list(range(self.global_batch)):
            raise CheckpointError(
                f"{self.directory / METADATA}: its parts do not hold each of the "
                f"{self.global_batch} rows of a batch exactly once"
            )
        self.dtype = shard_dtype(self.seq_len, self.layout.record_bytes)

    def shard_path(self, step: int, part: int) -> epath.Path:
        first = step - step % self.steps_per_shard
        return self.directory / SHARDS / f"s{first:08d}.p{part:04d}.npy"

    def shard_shape(self, step: int, part: int) -> tuple[int, int]:
        first = step - step % self.steps_per_shard
        return (min(self.steps_per_shard, self.steps - first), len(self.parts[part]))

    def shard_bytes(self, step: int, part: int) -> int:
        shape = self.shard_shape(step, part)
        return len(shard_header(shape, self.dtype)) + math.prod(shape) * self.dtype.itemsize

    def shard_problem(self, step: int, part: int) -> str | None:
        """Why the shard holding (step, part) cannot be read, or None when it is whole."""
        path = self.shard_path(step, part)
        if not path.exists():
            return f"shard {path} is missing"
        size, want = path.stat().length, self.shard_bytes(step, part)
        if size != want:
            return f"shard {path} has {size} bytes; expected {want} (an interrupted write?)"
        return None

    def check_shards(self, steps: int, rows: Sequence[int] | None = None) -> None:
        """Raises unless every shard holding `rows` (default all) of steps [0, steps) is
        present and whole, naming the first that is not."""
        if steps > self.steps:
            raise ConfigError(
                f"the cache at {self.directory} holds {self.steps} steps; {steps} are needed. "
                f"Extend it: python -m launch.teacher_logits ... --steps={steps}"
            )
        rows = range(self.global_batch) if rows is None else rows
        parts = sorted({self._part(r)[0] for r in rows})
        for first in range(0, steps, self.steps_per_shard):
            for part in parts:
                why = self.shard_problem(first, part)
                if why is not None:
                    raise CheckpointError(
                        f"{why}; rerun python -m launch.teacher_logits with the same "
                        "arguments to complete the cache"
                    )

    def _part(self, row: int) -> tuple[int, int]:
        if row not in self._where:
            raise DataError(
                f"row {row}; expected a row of the global batch [0, {self.global_batch})"
            )
        return self._where[row]

    def read(self, step: int, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The records of these rows of global batch `step`: (uint8[b, T, R], the rows'
        tokens_crc32 uint32[b]), in the order of `rows`."""
        if not _is_int(step) or not 0 <= step < self.steps:
            raise DataError(f"step={step!r}; the cache holds steps [0, {self.steps})")
        by_part: dict[int, list[tuple[int, int]]] = {}
        for i, row in enumerate(rows):
            part, j = self._part(int(row))
            by_part.setdefault(part, []).append((i, j))
        out = np.empty((len(rows), self.seq_len, self.layout.record_bytes), np.uint8)
        crc = np.empty(len(rows), np.uint32)
        for part, pairs in by_part.items():
            lo, hi = min(j for _, j in pairs), max(j for _, j in pairs) + 1
            block = self._read_rows(step, part, lo, hi)
            stored = block["records_crc32"]
            found = records_crc32(block["records"])
            damaged = np.flatnonzero(stored != found)
            if damaged.size:
                raise CheckpointError(
                    f"shard {self.shard_path(step, part)}: checksum mismatch in step {step}, "
                    f"row {self.parts[part][lo + int(damaged[0])]}: the file is damaged; "
                    "delete it and rerun python -m launch.teacher_logits to write it again"
                )
            for i, j in pairs:
                out[i] = block["records"][j - lo]
                crc[i] = block["tokens_crc32"][j - lo]
        return out, crc

    def _read_rows(self, step: int, part: int, lo: int, hi: int) -> np.ndarray:
        path = self.shard_path(step, part)
        shape = self.shard_shape(step, part)
        offset = len(shard_header(shape, self.dtype))
        start = offset + ((step % self.steps_per_shard) * shape[1] + lo) * self.dtype.itemsize
        size = (hi - lo) * self.dtype.itemsize
        try:
            with path.open("rb") as f:
                header = f.read(offset)
                f.seek(start)
                buf = f.read(size)
        except FileNotFoundError:
            raise CheckpointError(f"shard {path} is missing") from None
        if header != shard_header(shape, self.dtype):
            raise CheckpointError(
                f"shard {path} does not hold a {shape} array of {self.dtype}; it is damaged"
            )
        if len(buf) != size:
            raise CheckpointError(f"shard {path} is truncated (step {step}, rows {lo}..{hi - 1})")
        return np.frombuffer(buf, self.dtype)

    def mismatches(
        self,
        data_config: data.DataConfig,
        *,
        vocab_size: int | None = None,
        teacher_config=None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """How a run differs from the one this cache was written for: its data settings
        (and the data file's size), the student's vocabulary, the teacher's architecture
        (a LlamaConfig) and weights (`checkpoint.fingerprint`); each given one checked.
        Returns readable differences, empty when none."""
        out = []
        saved, now = self.meta["data"], data_settings(data_config)
        for key in (*DATA_KEYS, "sources", "bytes", "stores"):
            # A file's size is compared when both sides know it; caches that predate the
            # sources and stores keys have neither.
            if key in ("bytes", "stores") and (saved.get(key) is None or now[key] is None):
                continue
            if key == "sources" and key not in saved:
                continue
            if saved.get(key) != now[key]:
                out.append(f"data.{key}: cache {saved.get(key)!r}, run {now[key]!r}")
        if vocab_size is not None and vocab_size != self.layout.vocab_size:
            out.append(f"vocabulary: cache {self.layout.vocab_size}, student {vocab_size}")
        teacher = self.meta["teacher"]["fingerprint"]
        if teacher_config is not None:
            if teacher["config_sha256"] != formats.config_digest(teacher_config):
                out.append("teacher: another architecture")
        if fingerprint is not None:
            why = formats.fingerprint_mismatch(teacher, fingerprint)
            if why is not None:
                out.append(f"teacher: {why}")
        return out


class CachedBatches:
    """A `data.DataIterator`'s batches with the teacher's cached records of the same
    rows added as `RECORDS`, uint8[B, T, R] sharded like the batch on B and T.

    Each process reads only its own rows, whichever mesh and processes wrote the
    cache. Every batch's tokens are checked against the CRC-32s the cache stored for
    its rows (a DataError on a mismatch). The state is the iterator's, so a run resumes
    exactly with `state()` / `restore()`.

    steps: the steps the run will read; every shard they need is checked to be present
    and whole, and the tokens of the first batch to be the cache's, on construction.
    """

    def __init__(self, iterator: data.DataIterator, cache: LogitCache, steps: int):
        self.iterator, self.cache = iterator, cache
        b, t = iterator.config.global_batch, iterator.config.seq_len
        if (b, t) != (cache.global_batch, cache.seq_len):
            raise ConfigError(
                f"the cache holds batches of {cache.global_batch} rows of {cache.seq_len} "
                f"tokens; the data gives {b} rows of {t}"
            )
        self._rows = local_rows(iterator.sharding, (b, t))
        cache.check_shards(steps, self._rows)
        self.sharding = records_sharding(iterator.sharding)
        self._shape = (b, t, cache.layout.record_bytes)
        self.local_batch(iterator.state()["step"])
        # The records of the next `prefetch` steps are read and placed in the background, as
        # the iterator's batches are. The maker holds no reference to self (see DataIterator).
        make = functools.partial(_placed_records, cache, self._rows, self.sharding, self._shape)
        self._ahead = data.Prefetcher(make, iterator.config.prefetch)
        self._finalizer = weakref.finalize(self, self._ahead.close)

    def state(self) -> dict[str, int]:
        return self.iterator.state()

    def restore(self, state: Mapping[str, int]) -> None:
        self.iterator.restore(state)

    def store_digests(self) -> dict[str, str]:
        return self.iterator.store_digests()

    def close(self) -> None:
        self._finalizer()
        self.iterator.close()

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch `step`: the iterator's fields and `RECORDS`."""
        batch = self.iterator.local_batch(step)
        records, crc = self.cache.read(step, self._rows)
        self._check_tokens(step, batch["tokens"], crc)
        return batch | {RECORDS: records}

    def __iter__(self) -> CachedBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        step = self.iterator.state()["step"]
        local, placed = self.iterator.take()
        records, crc = self._ahead.get(step)
        self._check_tokens(step, local["tokens"], crc)
        return placed | {RECORDS: records}

    def _check_tokens(self, step: int, tokens: np.ndarray, crc: np.ndarray) -> None:
        bad = np.flatnonzero(crc != tokens_crc32(tokens))
        if bad.size:
            raise DataError(
                f"batch {step}, row {int(self._rows[bad[0]])}: its tokens are not the ones the "
                f"cache at {self.cache.directory} was written for; the data file changed, or "
                "the cache belongs to other data"
            )


def _placed_records(
    cache: LogitCache, rows: Sequence[int], sharding: Sharding, shape: tuple, step: int
) -> tuple[jax.Array, np.ndarray]:
    """Batch `step`'s records of this process's rows, placed as the global uint8[B, T, R]
    array, and the rows' tokens_crc32."""
    records, crc = cache.read(step, rows)
    return jax.make_array_from_process_local_data(sharding, records, shape), crc
