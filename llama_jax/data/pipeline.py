"""Training data: text, JSONL, pre-tokenized or token-store sources -> packed rows -> global
batches.

Sources (`DataConfig.format`):
  text    plain text; documents are separated by one or more blank lines.
  jsonl   one JSON object per line; the document is the string in `DataConfig.field`.
  tokens  a .npy integer array. 1-D: a stream of token ids in which each document ends with the
          EOS id (used as is: no BOS/EOS is added). 2-D [R, T]: rows already packed; segment ids
          come from a sibling `<stem>.segments.npy` of the same shape, else each row is one
          segment.
  store   a token store directory (`store.py`, written by `python -m launch.prepare_data`):
          rows already tokenized, shuffled and packed. A directory holding a manifest.json is
          read as a store whatever `format` says. `DataConfig.sources` mixes several stores by
          weight (`mixture.py`).

Packing (text, JSONL and 1-D tokens): each document becomes BOS + its tokens + EOS (per
`add_bos` / `add_eos`); documents are concatenated in file order and cut into rows of exactly T
tokens, so a document runs on into the next row when it does not fit. Each piece of a document is
its own segment, numbered 1, 2, ... within its row. Only the end of the last row is padding
(token 0, segment 0).

Order: the rows are visited in a fresh permutation each epoch and global batch k holds positions
[k*B, (k+1)*B) of that endless sequence, running across epoch boundaries, so no row is dropped. A
batch is therefore a function of (seed, k) alone and the iterator's whole state is the next step.
Text, JSONL and .npy sources use `np.random.default_rng((seed, epoch)).permutation(R)`; a store's
epochs use a keyed permutation computed per row (`permute.EpochOrder`), so that no R-sized array
is ever built: a store of any size opens by reading its manifest alone.

Each process builds only the rows its own devices hold and the global `jax.Array` is assembled
from those. Text and JSONL sources are still read, tokenized and packed whole on every host (a
hint says so for files over 100 MB); 2-D tokens files are read row by row on each host (memory
mapped locally, one read per row on remote file systems such as gs://). A store's rows are read
by range, rows adjacent in a shard in one read, many reads in flight at once on a thread pool,
and `DataConfig.prefetch` batches ahead of the one in use are read in the background and
placed on the devices there too, so `next` only hands over arrays that are already in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, Sharding

from llama_jax.data import jsonl, mixture, store
from llama_jax.data.prefetch import Prefetcher
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError

FORMATS = ("text", "jsonl", "tokens", "store")
FIELDS = ("tokens", "segment_ids", "targets", "loss_mask")

# Token ids and segment ids are int32 on device.
_MAX_ID = np.iinfo(np.int32).max
# Documents per tokenizer call: batched for speed, bounded so a large corpus is not held twice
# (as text and as the tokenizer's encodings) all at once.
_ENCODE_CHUNK = 4096
# A blank line is empty or whitespace only; runs of them separate documents. The pattern ends at
# the last newline of the run, so the next document's leading indentation is kept.
_BLANK_LINES = re.compile(r"\n\s*\n")
# Range reads of a store in flight at once, per process.
READS_IN_FLIGHT = 32
# Text and JSONL files larger than this get a hint towards prepare_data.
_HINT_BYTES = 100_000_000
# Steps between two log lines of a mixture's tokens per source.
_MIXTURE_LOG_EVERY = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training data is and how it is batched.

    path: a file (local or any `etils.epath` file system, e.g. gs://), or a token store
      directory; "" when `sources` is given.
    format: "text", "jsonl", "tokens" or "store" (see the module docstring); a path holding a
      manifest.json, and `sources`, make it "store".
    field: the JSONL key that holds each document's text.
    seq_len: T, tokens per row (>= 2: a row needs a token and its target).
    global_batch: B, rows per step across all processes.
    seed: the row order's seed (>= 0).
    add_bos, add_eos: put BOS / EOS around each text or JSONL document.
    prefetch: batches of a store read ahead in the background (0: read when asked for).
    sources: token stores mixed by weight, instead of `path`: "STORE:0.7,STORE:0.3", a list
      of such strings, or of {"path", "weight"} mappings; kept as ((path, weight), ...).
    """

    path: str
    format: str
    field: str = "text"
    seq_len: int
    global_batch: int
    seed: int = 0
    add_bos: bool = True
    add_eos: bool = True
    prefetch: int = 2
    sources: Any = ()

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"data format {self.format!r} is unknown; expected one of {FORMATS}")
        # Frozen: the normalised values are set once, here.
        object.__setattr__(self, "sources", mixture.parse_sources(self.sources))
        if self.sources:
            if self.path:
                raise DataError(
                    f"data.path={self.path!r} and data.sources are both set; give one of them"
                )
            object.__setattr__(self, "format", "store")
        elif self.path and self.format != "store" and store.is_store(self.path):
            object.__setattr__(self, "format", "store")
        for name, low in (("seq_len", 2), ("global_batch", 1), ("seed", 0), ("prefetch", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise DataError(f"{name}={value!r}; expected an integer >= {low}")
        if self.format == "jsonl" and not self.field:
            raise DataError("field is empty; expected the JSONL key that holds the text")


class DataIterator:
    """Global batches of packed rows: `next(it)` is a dict of `FIELDS`, each a `jax.Array`
    int32 [B, T] with `sharding`.

    tokens:      the row's token ids (0 where padding).
    segment_ids: 1, 2, ... per document piece within the row; 0 for padding.
    targets:     tokens shifted left by one within the row; 0 at the last position.
    loss_mask:   1 where the target is the next token of the same non-zero segment, else 0 (so 0
                 at each segment's last token and at every row's last position).

    `tokenizer` is needed for text and JSONL, and gives the EOS id that splits a 1-D token stream
    (or pass `eos_id`). Token ids are checked against `vocab_size` (default: the tokenizer's);
    rows of a 2-D tokens file are checked as they are read, since a full scan would make every
    host read the whole file.

    `sharding` places the [B, T] batch (e.g. `NamedSharding(mesh, PartitionSpec(("dcn", "data",
    "fsdp")))`); each process builds only the rows its addressable devices hold.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Tokenizer | None,
        sharding: Sharding,
        *,
        vocab_size: int | None = None,
        eos_id: int | None = None,
    ):
        self.config = config
        self.sharding = sharding
        self._global_shape = (config.global_batch, config.seq_len)
        _check_sharding(sharding, self._global_shape)
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.vocab_size
        if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
            raise DataError(f"vocab_size={vocab_size!r}; expected a positive integer")
        self._id_limit = _MAX_ID + 1 if vocab_size is None else vocab_size
        self._rows = self._mixture = self._prefetcher = None
        if config.format == "store":
            self._mixture = _open_stores(config, tokenizer, vocab_size)
        else:
            path = epath.Path(config.path)
            store.check_not_unfinished(path)
            if not path.is_file():
                raise DataError(
                    f"data file {config.path!r} does not exist (format {config.format!r})"
                )
            if config.format == "tokens":
                self._rows = _tokens_source(path, config, tokenizer, eos_id, self._id_limit)
            else:
                self._rows = _text_source(path, config, tokenizer, self._id_limit)
        # Only the batch dimension is split across processes here: a process's rows are the
        # sorted union of its devices' batch slices, the order make_array_from_process_local_data
        # expects its local data in.
        index_map = sharding.addressable_devices_indices_map(self._global_shape)
        self._local_positions = _batch_positions(index_map, config.global_batch)
        self._perms: dict[int, np.ndarray] = {}
        self._step = 0
        if self._mixture is not None:
            self._reads = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="data-read")
            # The batch maker holds no reference to the iterator, so that dropping the iterator
            # (without close()) ends its threads too.
            make = functools.partial(
                _store_batch,
                self._mixture,
                self._local_positions,
                self._reads,
                functools.partial(_place, sharding, self._global_shape),
            )
            self._prefetcher = Prefetcher(make, config.prefetch)
            self._finalizer = weakref.finalize(self, _shutdown, self._prefetcher, self._reads)

    @property
    def num_rows(self) -> int:
        """R: packed rows in the source (all sources of a mixture together)."""
        if self._mixture is not None:
            return sum(s.num_rows for s in self._mixture.stores)
        return self._rows.num_rows

    def source_tokens(self) -> dict[str, int]:
        """Token slots (rows x T, padding included) each store source has given the global
        batches before the next step; {} for other sources."""
        if self._mixture is None:
            return {}
        rows = self._mixture.consumed(self._step)
        t = self.config.seq_len
        return {s.directory: int(n) * t for s, n in zip(self._mixture.stores, rows, strict=True)}

    def store_digests(self) -> dict[str, str]:
        """Each store source's digest (`Manifest.digest`, the same exactly when its rows are)
        by its path; {} for other sources."""
        if self._mixture is None:
            return {}
        return {s.directory: s.manifest.digest for s in self._mixture.stores}

    def close(self) -> None:
        """Stops a store's background reads (also done when the iterator is garbage
        collected)."""
        if self._mixture is not None:
            self._finalizer()

    @property
    def batches_per_epoch(self) -> float:
        """R / B; fractional when batches run across an epoch boundary."""
        return self.num_rows / self.config.global_batch

    def state(self) -> dict[str, int]:
        """The whole iterator state, JSON-serialisable: the step of the next batch."""
        return {"step": self._step}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state()` of another iterator over the same config and data."""
        step = state.get("step") if isinstance(state, Mapping) else None
        if not _is_int(step) or step < 0 or set(state) != {"step"}:
            raise DataError(f"data iterator state {state!r}; expected {{'step': int >= 0}}")
        self._step = int(step)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: each of `FIELDS` int32 [b, T], the rows
        in increasing global batch index (b = B when one process addresses every device)."""
        if not _is_int(step) or step < 0:
            raise DataError(f"step={step!r}; expected an integer >= 0")
        return self._made(step).local

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return self.take()[1]

    def take(self) -> tuple[dict[str, np.ndarray], dict[str, jax.Array]]:
        """The next batch both as this process's rows (`local_batch`) and as the global arrays
        `next` gives; advances by one step."""
        made = self._made(self._step)
        self._step += 1
        if self._mixture is not None and len(self.config.sources) > 1:
            if self._step % _MIXTURE_LOG_EVERY == 0:
                seen = ", ".join(f"{p}: {n:,}" for p, n in self.source_tokens().items())
                logging.info("data: tokens seen per source after %d steps: %s", self._step, seen)
        if made.placed is not None:
            return made.local, made.placed
        return made.local, _place(self.sharding, self._global_shape, made.local)

    def _made(self, step: int) -> _Batch:
        if self._prefetcher is not None:
            return self._prefetcher.get(step)
        positions = step * self.config.global_batch + self._local_positions
        return _Batch(row_fields(*self._rows.read(self._row_ids(positions))), None)

    def _row_ids(self, positions: np.ndarray) -> np.ndarray:
        """Source rows at these positions of the endless sequence of epoch permutations."""
        epochs, offsets = np.divmod(positions, self.num_rows)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            rows[at] = self._permutation(int(epoch))[offsets[at]]
        return rows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A batch spans at most two epochs (B <= R), so two cached permutations suffice.
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng((self.config.seed, epoch))
            self._perms[epoch] = rng.permutation(self.num_rows)
        return self._perms[epoch]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def row_fields(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """`FIELDS` of packed rows: int32 tokens and segment ids [b, T], and the targets and
    loss mask that follow (each token predicts the next one of its own segment)."""
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros_like(segment_ids)
    loss_mask[:, :-1] = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
    return {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "targets": targets,
        "loss_mask": loss_mask,
    }


@dataclasses.dataclass(frozen=True)
class _Batch:
    """A process's rows of one batch (`local`) and, when made ahead, the global arrays already
    placed on the devices (`placed`)."""

    local: dict[str, np.ndarray]
    placed: dict[str, jax.Array] | None


def _place(
    sharding: Sharding, shape: tuple[int, int], local: Mapping[str, np.ndarray]
) -> dict[str, jax.Array]:
    return {
        name: jax.make_array_from_process_local_data(sharding, rows, shape)
        for name, rows in local.items()
    }


def _store_batch(
    stores: mixture.Mixture,
    positions: np.ndarray,
    reads: ThreadPoolExecutor,
    place: Any,
    step: int,
) -> _Batch:
    """A process's rows of batch `step` of a store or mixture, all `FIELDS` made and placed on
    the devices (on a prefetch thread, so the training thread only takes the arrays)."""
    local = row_fields(*stores.read(step, positions, reads))
    return _Batch(local, place(local))


def _shutdown(prefetcher: Prefetcher, reads: ThreadPoolExecutor) -> None:
    prefetcher.close()
    reads.shutdown(wait=False, cancel_futures=True)


def _open_stores(
    config: DataConfig, tokenizer: Tokenizer | None, vocab_size: int | None
) -> mixture.Mixture:
    """The store(s) of `config` as a Mixture (one store: weight 1), each checked against the
    run before anything is compiled: seq_len, vocabulary, tokenizer."""
    specs = config.sources or ((config.path, 1.0),)
    stores = []
    for path, _ in specs:
        token_store = store.TokenStore(path)
        token_store.check(
            seq_len=config.seq_len,
            vocab_size=vocab_size,
            tokenizer_path=None if tokenizer is None else tokenizer.path,
        )
        stores.append(token_store)
    if not config.sources:
        _check_enough(epath.Path(config.path), stores[0].num_rows, config)
    return mixture.Mixture(stores, [w for _, w in specs], config.seed, config.global_batch)


def _check_sharding(sharding: Sharding, shape: tuple[int, int]) -> None:
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if len(spec) > 2:
            raise DataError(
                f"batch sharding spec {sharding.spec} has {len(spec)} dimensions; "
                "expected at most 2 for [B, T]"
            )
        axes = spec[0] if spec else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        sizes = {a: sharding.mesh.shape[a] for a in axes}
        if shape[0] % math.prod(sizes.values()):
            raise DataError(
                f"global_batch={shape[0]} is not divisible by the batch mesh axes {sizes} "
                f"(product {math.prod(sizes.values())}); use a multiple of it"
            )
    try:
        sharding.shard_shape(shape)
    except ValueError as e:
        raise DataError(f"batch shape {shape} cannot be split by {sharding}: {e}") from e


def _batch_positions(index_map: Mapping, batch: int) -> np.ndarray:
    """Sorted global batch indices covered by these devices' [B, T] indices."""
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(batch)))
    return np.array(sorted(rows), dtype=np.int64)


class _PackedRows:
    """Rows packed in memory: int32 tokens and segment ids [R, T]."""

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray):
        self._tokens = tokens
        self._segment_ids = segment_ids
        self.num_rows = len(tokens)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._tokens[rows], self._segment_ids[rows]


class _NpyRows:
    """Rows of a 2-D tokens file (and its segments file), read on demand and checked as read."""

    def __init__(
        self,
        path: epath.Path,
        header: _NpyHeader,
        segments: tuple[epath.Path, _NpyHeader] | None,
        id_limit: int,
    ):
        self._path = path
        self._tokens = _open_rows(path, header)
        self._seg_path = None if segments is None else segments[0]
        self._segment_ids = None if segments is None else _open_rows(*segments)
        self._id_limit = id_limit
        self.num_rows, self._seq_len = header.shape

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = self._tokens[rows]
        self._check(tokens, self._id_limit, self._path, rows, "token id", "vocab_size")
        if self._segment_ids is None:
            segment_ids = np.ones((len(rows), self._seq_len), np.int32)
        else:
            segment_ids = self._segment_ids[rows]
            self._check(segment_ids, _MAX_ID + 1, self._seg_path, rows, "segment id", "int32")
        return tokens.astype(np.int32), segment_ids.astype(np.int32)

    @staticmethod
    def _check(ids, limit, path, rows, what, bound):
        bad = _first_outside(ids, limit)
        if bad is not None:
            i, j = bad
            raise DataError(
                f"{path}: {what} {int(ids[i, j])} in row {int(rows[i])}, column {j} is outside "
                f"[0, {limit}) ({bound})"
            )


class _RemoteRows:
    """Rows of a C-order 2-D .npy file read one seek at a time, for file systems that cannot be
    memory-mapped."""

    def __init__(self, path: epath.Path, header: _NpyHeader):
        self._path = path
        self._header = header

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        dtype, width = self._header.dtype, self._header.shape[1]
        row_bytes = width * dtype.itemsize
        out = np.empty((len(rows), width), dtype)
        with self._path.open("rb") as f:
            for i, row in enumerate(rows):
                f.seek(self._header.offset + int(row) * row_bytes)
                out[i] = np.frombuffer(f.read(row_bytes), dtype)
        return out


def _open_rows(path: epath.Path, header: _NpyHeader) -> np.ndarray | _RemoteRows:
    if "://" not in os.fspath(path):
        return np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
    if header.fortran_order:
        raise DataError(f"{path} is stored in Fortran order; save it in C order to read its rows")
    return _RemoteRows(path, header)


def _first_outside(ids: np.ndarray, limit: int) -> tuple[int, ...] | None:
    """Index of the first id outside [0, limit), or None."""
    bad = (ids < 0) | (ids >= limit)
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None


def _check_stream(stream: np.ndarray, limit: int, path: epath.Path) -> None:
    bad = _first_outside(stream, limit)
    if bad is not None:
        raise DataError(
            f"{path}: token id {int(stream[bad])} at token {bad[0]} is outside [0, {limit}) "
            "(vocab_size)"
        )


@dataclasses.dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int


def _npy_header(path: epath.Path) -> _NpyHeader:
    """A .npy file's header alone (no data read, nothing unpickled), checked against its size."""
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise DataError(f"{path} is not a readable .npy file: {e}") from e
        header = _NpyHeader(shape, dtype, fortran_order, f.tell())
    if not np.issubdtype(dtype, np.integer) or len(shape) not in (1, 2):
        raise DataError(
            f"{path} holds a {dtype} array of shape {shape}; expected a 1-D or 2-D integer array"
        )
    size = header.offset + math.prod(shape) * dtype.itemsize
    if path.stat().length < size:
        raise DataError(f"{path} is truncated: {path.stat().length} bytes, its header needs {size}")
    return header


def _tokens_source(
    path: epath.Path,
    config: DataConfig,
    tokenizer: Tokenizer | None,
    eos_id: int | None,
    id_limit: int,
) -> _PackedRows | _NpyRows:
    header = _npy_header(path)
    if len(header.shape) == 2:
        if header.shape[1] != config.seq_len:
            raise DataError(
                f"{path} holds rows of {header.shape[1]} tokens (shape {header.shape}); "
                f"expected seq_len={config.seq_len}"
            )
        _check_enough(path, header.shape[0], config)
        seg_path = path.with_name(path.stem + ".segments.npy")
        segments = None
        if seg_path.is_file():
            segments = (seg_path, _npy_header(seg_path))
            if segments[1].shape != header.shape:
                raise DataError(
                    f"{seg_path} has shape {segments[1].shape}; expected the shape of its tokens "
                    f"file {path}, {header.shape}"
                )
        return _NpyRows(path, header, segments, id_limit)

    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    if eos_id is None:
        raise DataError(
            f"{path} is a 1-D token stream whose documents end with EOS, but no EOS id is known; "
            "pass a tokenizer that has one or eos_id"
        )
    with path.open("rb") as f:
        stream = np.load(f, allow_pickle=False)
    _check_stream(stream, id_limit, path)
    starts = np.flatnonzero(stream == eos_id) + 1
    return _pack(path, stream.astype(np.int32), starts, config)


def _text_source(
    path: epath.Path, config: DataConfig, tokenizer: Tokenizer | None, id_limit: int
) -> _PackedRows:
    if tokenizer is None:
        raise DataError(f"format {config.format!r} needs a tokenizer to encode {path}; got None")
    if config.add_bos and tokenizer.bos_id is None:
        raise DataError(f"add_bos=True but the tokenizer {tokenizer.path} has no BOS token")
    if config.add_eos and tokenizer.eos_id is None:
        raise DataError(f"add_eos=True but the tokenizer {tokenizer.path} has no EOS token")
    size = path.stat().length
    if size > _HINT_BYTES:
        logging.warning(
            "%s is %.0f MB of %s that every host reads and tokenizes whole at start-up; "
            "`python -m launch.prepare_data` turns it into a token store that each host reads "
            "only its rows of",
            path,
            size / 1e6,
            config.format,
        )
    docs = read_text(path) if config.format == "text" else read_jsonl(path, config.field)
    encoded = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        encoded += tokenizer.encode_batch(
            docs[i : i + _ENCODE_CHUNK], add_bos=config.add_bos, add_eos=config.add_eos
        )
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    stream = np.fromiter(
        (i for ids in encoded for i in ids), dtype=np.int64, count=int(lengths.sum())
    )
    _check_stream(stream, id_limit, path)
    return _pack(path, stream.astype(np.int32), np.cumsum(lengths), config)


def read_text(path: epath.Path) -> list[str]:
    """The documents of a UTF-8 text file: blocks separated by blank lines."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    text = text.replace("\r\n", "\n")
    return [doc.strip("\n") for doc in _BLANK_LINES.split(text) if doc.strip()]


def read_jsonl(path: epath.Path, field: str) -> list[str]:
    """The `field` string of every line of a JSONL file (a bad line is named)."""
    return [text for _, text in jsonl.strings(path, field)]


def _pack(
    path: epath.Path, stream: np.ndarray, starts: np.ndarray, config: DataConfig
) -> _PackedRows:
    """Cuts a token stream into rows of T, numbering segments within each row.

    stream: int32 [N], every document's tokens back to back.
    starts: int [*], where documents begin (0 is implied; positions >= N are ignored).
    """
    n, seq_len = len(stream), config.seq_len
    num_rows = -(-n // seq_len)
    _check_enough(path, num_rows, config)
    tokens = np.zeros(num_rows * seq_len, np.int32)
    tokens[:n] = stream
    new_segment = np.zeros(num_rows * seq_len, bool)
    new_segment[starts[starts < n]] = True
    # A document cut at a row boundary continues as a new segment of the next row.
    new_segment[::seq_len] = True
    segment_ids = np.cumsum(new_segment.reshape(num_rows, seq_len), axis=1, dtype=np.int32)
    segment_ids.reshape(-1)[n:] = 0
    return _PackedRows(tokens.reshape(num_rows, seq_len), segment_ids)


def _check_enough(path: epath.Path, num_rows: int, config: DataConfig) -> None:
    if num_rows < config.global_batch:
        raise DataError(
            f"{path} makes {num_rows} rows of seq_len={config.seq_len}; global_batch="
            f"{config.global_batch} needs at least {config.global_batch}"
        )
