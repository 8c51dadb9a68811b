"""Corpus -> token store (`store.py`): read, tokenize in worker processes, shuffle documents,
pack, write shards, write the manifest last.

Two passes, so memory does not grow with the corpus:

1. Tokenize and spill. Documents are read in input order (files as `corpus.find_inputs` lists
   them) in chunks; `workers` processes encode the chunks (each loads the tokenizer itself and
   encodes on one thread) and the results are taken back in submission order. Document d (its
   ordinal in that order) goes to bucket `mix64(seed_key ^ d) % buckets`, a seeded hash, and is
   appended to that bucket's spill files on local disk. The bucket count comes from the input
   size (about `bucket_bytes` of text per bucket), so a bucket fits in memory whatever the
   corpus.
2. Pack. Buckets are taken in order; each is loaded, its documents are put in a seeded random
   order (`default_rng((seed, 1, bucket))`), packed (`packing.py`), and the rows are cut into
   shards of `rows_per_shard`.

Independent uniform buckets followed by a uniform order within each bucket make the whole
document order a uniform random permutation, and nothing in either pass depends on the number
of workers or on timing, so the store's bytes are a function of the inputs, the tokenizer and
the settings alone.

Every shard is written under `<name>.tmp` and renamed when complete (on gs://, where an object
appears only once its upload is complete, in place); manifest.json is written last. A rerun
(after a crash, or with some shards damaged or deleted) keeps each shard file whose sha256 equals
that of the shard it would write and writes the others. The spill is kept until the store is
complete (under out_dir; for a gs:// out_dir in the local temp directory), so a rerun after the
first pass only packs again. A store that is already complete with the same
settings is checked and left alone; other settings need `overwrite`, and the store being
replaced stays readable until every input has been read and tokenized (a bad input leaves it
as it was).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from llama_jax import paths
from llama_jax.data import corpus, packing, store
from llama_jax.data.permute import mix64
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError, DataError, Error

# Text bytes per shuffle bucket (compressed inputs count 4x their size).
BUCKET_BYTES = 256 << 20
MAX_BUCKETS = 16384
# About this many bytes per shard.
SHARD_BYTES = 128 << 20
SPILL_DIR = store.SPILL_DIR
_SPILL_DONE = "spill.json"
# A chunk of documents sent to a worker: at most this many documents or bytes of text.
_CHUNK_DOCS = 512
_CHUNK_TEXT = 1 << 20
# Spilled tokens buffered in memory before they are appended to the bucket files.
_SPILL_BUFFER = 64 << 20
_COMPRESSION_GUESS = 4


def prepare_store(
    inputs: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    field: str = "text",
    format: str = "auto",
    pack: str = "concat",
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
    rows_per_shard: int | None = None,
    bucket_bytes: int = BUCKET_BYTES,
    open_rows: int = packing.BEST_FIT_OPEN_ROWS,
    log: Callable[[str], None] | None = None,
    every_s: float = 5.0,
) -> dict[str, Any]:
    """Writes the token store of `inputs` (paths, directories or globs; see `corpus.py`) to
    `out_dir` and returns its manifest plus `seconds`, `kept` and `written` (shards).

    add_bos: None follows the tokenizer's default; add_eos: None adds EOS when the tokenizer has
    one. rows_per_shard: None makes shards of about 128 MB. `log` receives the progress lines
    (at most one every `every_s` seconds) and the summary.
    """
    started = time.perf_counter()
    say = log or (lambda line: None)
    _check_options(seq_len, pack, workers, seed, field, rows_per_shard, bucket_bytes)
    add_bos, add_eos = _special_tokens(tokenizer, add_bos, add_eos)
    sources = corpus.find_inputs(list(inputs), format)
    out = str(out_dir).rstrip("/")
    if "://" not in out:
        out = os.path.abspath(out)
    paths.check_apart(out, [s.path for s in sources], flag="--out_dir")

    dtype = store.token_dtype(tokenizer.vocab_size)
    rdtype = store.row_dtype(seq_len, dtype)
    if rows_per_shard is None:
        rows_per_shard = max(1, SHARD_BYTES // rdtype.itemsize)
    text_bytes = sum(s.bytes * (_COMPRESSION_GUESS if s.compressed else 1) for s in sources)
    buckets = min(MAX_BUCKETS, max(1, math.ceil(text_bytes / bucket_bytes)))
    settings = {
        "inputs": [{"path": s.path, "format": s.format, "bytes": s.bytes} for s in sources],
        "field": field,
        "strict": strict,
        "tokenizer_sha256": store.tokenizer_fingerprint(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "bos_id": tokenizer.bos_id if add_bos else None,
        "eos_id": tokenizer.eos_id if add_eos else None,
        "seq_len": seq_len,
        "pack": pack,
        "open_rows": open_rows if pack == "best_fit" else None,
        "seed": seed,
        "buckets": buckets,
        "rows_per_shard": rows_per_shard,
    }

    out_path = epath.Path(out)
    complete = _existing_store(out_path, settings, overwrite)
    if complete is not None:
        say(f"{out} is complete and intact ({len(complete['shards'])} shards); nothing to do")
        seconds = time.perf_counter() - started
        return complete | {"seconds": seconds, "kept": len(complete["shards"]), "written": 0}
    created = not out_path.exists()
    out_path.mkdir(parents=True, exist_ok=True)

    spill_dir = _spill_dir(out)
    spill = _Spill(spill_dir, buckets, dtype)
    counts = spill.done(settings)
    try:
        if counts is None:
            job = _Tokenize(
                sources=tuple(sources),
                field=field,
                strict=strict,
                tokenizer_path=tokenizer.path,
                bos=tokenizer.bos_id if add_bos else None,
                eos=tokenizer.eos_id if add_eos else None,
                dtype=dtype,
                seed=seed,
                workers=workers,
            )
            counts = job.run(spill, settings, say, every_s)
        if counts["documents"] == 0:
            raise DataError(
                f"no documents in {[s.path for s in sources]}: {counts['missing']} records "
                f"without a string {field!r}, {counts['empty']} empty"
            )
    except Error:
        # An input refused while reading leaves nothing of this run behind (a killed run
        # keeps its spill, which the rerun picks up).
        shutil.rmtree(spill_dir, ignore_errors=True)
        if created and "://" not in out:
            shutil.rmtree(out_path, ignore_errors=True)
        raise

    _retire(out_path)
    writer = _ShardWriter(out_path, rdtype, rows_per_shard)
    pack_started = last = time.perf_counter()
    packer = packing.packer(pack, seq_len, dtype, open_rows)
    for bucket in range(buckets):
        tokens, lengths = spill.bucket(bucket)
        offsets = np.cumsum(lengths) - lengths
        order = np.random.default_rng((seed, 1, bucket)).permutation(len(lengths))
        writer.add(packer.add([tokens[offsets[i] : offsets[i] + lengths[i]] for i in order]))
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            rate = writer.tokens / max(now - pack_started, 1e-9)
            say(
                f"packing: bucket {bucket + 1}/{buckets}, {writer.rows:,} rows, "
                f"{len(writer.shards)} shards ({writer.kept} kept), {rate:,.0f} tokens/s"
            )
    writer.add(packer.finish())
    writer.close()
    _remove_stale(out_path, len(writer.shards))

    manifest = _manifest(settings, counts, writer, tokenizer.path, rdtype)
    _write_atomic(out_path / store.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(spill_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    skipped = ""
    if counts["missing"] or counts["empty"]:
        skipped = (
            f"; skipped {counts['missing']} records without a string {field!r}"
            + (f" (first: {counts['first_missing']})" if counts["first_missing"] else "")
            + f" and {counts['empty']} empty documents"
        )
    say(
        f"wrote {out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
        f"{manifest['rows']:,} rows of {seq_len} ({pack}), padding "
        f"{manifest['padding_fraction']:.2%}, {len(writer.shards)} shards ({writer.kept} kept), "
        f"{seconds:.1f} s{skipped}"
    )
    return manifest | {"seconds": seconds, "kept": writer.kept, "written": writer.written}


def _check_options(seq_len, pack, workers, seed, field, rows_per_shard, bucket_bytes) -> None:
    store.check_dims(seq_len)
    if pack not in packing.PACK_MODES:
        raise ConfigError(f"pack={pack!r}; expected one of {packing.PACK_MODES}")
    for name, value, low in (
        ("workers", workers, 1),
        ("seed", seed, 0),
        ("bucket_bytes", bucket_bytes, 1),
    ):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name}={value!r}; expected an integer >= {low}")
    if rows_per_shard is not None and (not _is_int(rows_per_shard) or rows_per_shard < 1):
        raise ConfigError(f"rows_per_shard={rows_per_shard!r}; expected an integer >= 1")
    if not field:
        raise ConfigError("field is empty; expected the key or column that holds the text")


def _special_tokens(tokenizer: Tokenizer, add_bos, add_eos) -> tuple[bool, bool]:
    if add_bos is None:
        # The tokenizer's own default: an empty text encodes to [BOS] exactly when it adds one.
        add_bos = tokenizer.bos_id is not None and tokenizer.encode("") == [tokenizer.bos_id]
    if add_eos is None:
        add_eos = tokenizer.eos_id is not None
    if add_bos and tokenizer.bos_id is None:
        raise ConfigError(f"add_bos=True but the tokenizer {tokenizer.path} has no BOS token")
    if add_eos and tokenizer.eos_id is None:
        raise ConfigError(f"add_eos=True but the tokenizer {tokenizer.path} has no EOS token")
    return bool(add_bos), bool(add_eos)


def _is_ours(name: str) -> bool:
    base = name.removesuffix(".tmp")
    return (
        name == SPILL_DIR
        or base == store.MANIFEST
        or (base.startswith(store.SHARD_PREFIX) and base.endswith(".npy"))
    )


def _existing_store(out: epath.Path, settings: dict, overwrite: bool) -> dict | None:
    """The manifest of a complete, intact store with these settings in `out` (nothing to do),
    else None once `out` may be (re)written. A store that is to be replaced keeps its
    manifest, and so stays readable, until every input has been read (`_retire`)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"out_dir {out} exists and is not a directory")
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign:
        raise ConfigError(
            f"out_dir {out} holds files that are not a token store's ({foreign[:3]}); choose an "
            "empty or new directory"
        )
    manifest_path = out / store.MANIFEST
    if not manifest_path.exists():
        return None  # an interrupted run: resume it
    try:
        raw = json.loads(manifest_path.read_text())
    except ValueError:
        raw = {}
    if raw.get("settings") != settings:
        if not overwrite:
            raise ConfigError(
                f"out_dir {out} holds a token store made from other inputs or settings; pass "
                "--overwrite to replace it"
            )
        return None
    intact = all(
        (out / s["name"]).exists() and store.file_sha256(out / s["name"]) == s["sha256"]
        for s in raw["shards"]
    )
    if intact:
        return raw
    # Some shards are damaged or gone: the store is rebuilt, keeping the intact shards.
    return None


def _retire(out: epath.Path) -> None:
    """Removes the manifest of the store being replaced, just before its shards are written:
    from then on `out` is an interrupted store (no manifest) until the new manifest lands,
    never a manifest that describes other shards."""
    manifest_path = out / store.MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()


def _spill_dir(out: str) -> str:
    if "://" not in out:
        return os.path.join(out, SPILL_DIR)
    key = hashlib.sha256(out.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"llama_jax_spill_{key}")


class _Spill:
    """Tokenized documents by bucket on local disk: `b<i>.tok` (token ids back to back) and
    `b<i>.len` (uint32 lengths), appended in input order; `spill.json` marks them complete."""

    def __init__(self, directory: str, buckets: int, dtype: np.dtype):
        self.directory = directory
        self.buckets = buckets
        self.dtype = dtype
        self._tokens: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._lengths: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._buffered = 0

    def done(self, settings: dict) -> dict | None:
        """The counts of a complete spill made with `settings`, else None (and a fresh spill
        directory)."""
        marker = os.path.join(self.directory, _SPILL_DONE)
        if os.path.exists(marker):
            with open(marker) as f:
                saved = json.load(f)
            if saved.get("settings") == settings:
                return saved["counts"]
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory)
        return None

    def finish(self, settings: dict, counts: dict) -> None:
        self._flush()
        tmp = os.path.join(self.directory, _SPILL_DONE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"settings": settings, "counts": counts}, f)
        os.replace(tmp, os.path.join(self.directory, _SPILL_DONE))

    def add(self, flat: np.ndarray, lengths: np.ndarray, buckets: np.ndarray) -> None:
        """Documents (tokens `flat` back to back, uint32 `lengths`) into their `buckets`."""
        ends = np.cumsum(lengths, dtype=np.int64)
        starts = ends - lengths
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        bounds = np.flatnonzero(np.diff(sorted_buckets)) + 1
        for group in np.split(order, bounds):
            if not len(group):
                continue
            b = int(buckets[group[0]])
            self._tokens[b].append(
                np.concatenate([flat[starts[i] : ends[i]] for i in group]).astype(self.dtype)
            )
            self._lengths[b].append(lengths[group].astype(np.uint32))
        self._buffered += flat.nbytes
        if self._buffered >= _SPILL_BUFFER:
            self._flush()

    def bucket(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """A bucket's tokens and lengths (int64), in input order."""
        path = os.path.join(self.directory, f"b{b:05d}")
        if not os.path.exists(path + ".len"):
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        tokens = np.fromfile(path + ".tok", self.dtype)
        lengths = np.fromfile(path + ".len", np.uint32).astype(np.int64)
        return tokens, lengths

    def _flush(self) -> None:
        for b in sorted(self._tokens):
            path = os.path.join(self.directory, f"b{b:05d}")
            with open(path + ".tok", "ab") as f:
                for part in self._tokens[b]:
                    f.write(part.tobytes())
            with open(path + ".len", "ab") as f:
                for part in self._lengths[b]:
                    f.write(part.tobytes())
        self._tokens.clear()
        self._lengths.clear()
        self._buffered = 0


# ---- the first pass: read, tokenize, spill -----------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, bos: int | None, eos: int | None, dtype: str) -> None:
    # One thread per worker: --workers says how many cores encode.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER.update(
        tokenizer=Tokenizer.from_file(tokenizer_path), bos=bos, eos=eos, dtype=np.dtype(dtype)
    )


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` with BOS/EOS, back to back, and each document's length."""
    w = _WORKER
    ids = w["tokenizer"].encode_batch(texts, add_bos=False, add_eos=False)
    prefix = [w["bos"]] if w["bos"] is not None else []
    suffix = [w["eos"]] if w["eos"] is not None else []
    lengths = np.array([len(x) + len(prefix) + len(suffix) for x in ids], np.uint32)
    flat = np.fromiter(
        (t for x in ids for t in (*prefix, *x, *suffix)), w["dtype"], count=int(lengths.sum())
    )
    return flat, lengths


def _doc_chunks(
    sources: Sequence[corpus.Source], field: str, strict: bool, stats: corpus.ReadStats
) -> Iterator[list[str]]:
    chunk, size = [], 0
    for source in sources:
        for doc in corpus.documents(source, field, stats, strict):
            chunk.append(doc)
            size += len(doc)
            if len(chunk) >= _CHUNK_DOCS or size >= _CHUNK_TEXT:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """The first pass: what it reads and how it encodes."""

    sources: tuple[corpus.Source, ...]
    field: str
    strict: bool
    tokenizer_path: str
    bos: int | None
    eos: int | None
    dtype: np.dtype
    seed: int
    workers: int

    def run(self, spill: _Spill, settings: dict, say, every_s: float) -> dict:
        """Fills `spill`; returns the counts it saw."""
        stats = corpus.ReadStats()
        total_bytes = sum(s.bytes for s in self.sources)
        key = mix64(np.array([self.seed, 0x5EED], np.uint64))
        seed_key = key[0] ^ key[1]
        ordinal = tokens = 0
        started = last = time.perf_counter()

        def take(result):
            nonlocal ordinal, tokens
            flat, lengths = result
            ids = np.arange(ordinal, ordinal + len(lengths), dtype=np.uint64)
            bucket = (mix64(ids ^ seed_key) % np.uint64(spill.buckets)).astype(np.int64)
            spill.add(flat, lengths, bucket)
            ordinal += len(lengths)
            tokens += len(flat)

        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported this module once.
        ctx.set_forkserver_preload([__name__])
        initargs = (self.tokenizer_path, self.bos, self.eos, self.dtype.str)
        with ctx.Pool(self.workers, initializer=_init_worker, initargs=initargs) as pool:
            pending: collections.deque = collections.deque()
            for chunk in _doc_chunks(self.sources, self.field, self.strict, stats):
                pending.append(pool.apply_async(_encode, (chunk,)))
                # Results are taken in submission order, so timing never reorders documents.
                while len(pending) > 2 * self.workers + 2 or (pending and pending[0].ready()):
                    take(pending.popleft().get())
                now = time.perf_counter()
                if now - last >= every_s:
                    last = now
                    say(_progress_line(stats, tokens, total_bytes, now - started))
            while pending:
                take(pending.popleft().get())
        counts = {
            "documents": ordinal,
            "tokens": tokens,
            "missing": stats.missing,
            "empty": stats.empty,
            "first_missing": stats.first_missing,
        }
        spill.finish(settings, counts)
        say(_progress_line(stats, tokens, total_bytes, time.perf_counter() - started))
        return counts


def _progress_line(stats: corpus.ReadStats, tokens: int, total_bytes: int, elapsed: float) -> str:
    elapsed = max(elapsed, 1e-9)
    done = stats.bytes_read / max(total_bytes, 1)
    eta = f"{elapsed * (1 - done) / done:.0f} s" if done > 0 else "?"
    return (
        f"tokenizing: {stats.documents:,} documents ({stats.documents / elapsed:,.0f}/s), "
        f"{tokens:,} tokens ({tokens / elapsed:,.0f}/s), {stats.bytes_read / 1e6:,.1f}/"
        f"{total_bytes / 1e6:,.1f} MB read, ETA {eta}"
    )


# ---- the second pass: shards and the manifest -----------------------------------------------


class _ShardWriter:
    """Cuts a stream of packed rows into shard files, keeping a file already there when it holds
    exactly the bytes it would write."""

    def __init__(self, out: epath.Path, rdtype: np.dtype, rows_per_shard: int):
        self._out = out
        self._dtype = rdtype
        self._per = rows_per_shard
        self._blocks: list[packing.Rows] = []
        self._buffered = 0
        self.shards: list[dict] = []
        self.rows = self.tokens = self.kept = self.written = 0

    def add(self, rows: packing.Rows) -> None:
        if len(rows):
            self._blocks.append(rows)
            self._buffered += len(rows)
        while self._buffered >= self._per:
            self._emit(self._take(self._per))

    def close(self) -> None:
        if self._buffered:
            self._emit(self._take(self._buffered))

    def _take(self, n: int) -> packing.Rows:
        parts = {k: np.concatenate([getattr(b, k) for b in self._blocks]) for k in _ROW_FIELDS}
        head = packing.Rows(**{k: v[:n] for k, v in parts.items()})
        rest = packing.Rows(**{k: v[n:] for k, v in parts.items()})
        self._blocks = [rest] if len(rest) else []
        self._buffered = len(rest)
        return head

    def _emit(self, rows: packing.Rows) -> None:
        name = store.shard_name(len(self.shards))
        records = store.encode_rows(rows.tokens, rows.starts, rows.lengths, self._dtype)
        data, offset = store.shard_bytes(records)
        digest = hashlib.sha256(data).hexdigest()
        path = self._out / name
        if path.exists() and path.stat().length == len(data) and store.file_sha256(path) == digest:
            self.kept += 1
        else:
            _write_atomic(path, data)
            self.written += 1
        tokens = int(rows.lengths.sum())
        self.shards.append(
            dict(
                name=name,
                rows=len(rows),
                tokens=tokens,
                documents=int(rows.documents.sum()),
                bytes=len(data),
                data_offset=offset,
                sha256=digest,
            )
        )
        self.rows += len(rows)
        self.tokens += tokens


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(packing.Rows))


def _remove_stale(out: epath.Path, shards: int) -> None:
    """Temporary files, and shards past the last one (a previous store's)."""
    for path in out.iterdir():
        name = path.name
        stale_shard = (
            name.startswith(store.SHARD_PREFIX)
            and name.endswith(".npy")
            and name[len(store.SHARD_PREFIX) : -4].isdigit()
            and int(name[len(store.SHARD_PREFIX) : -4]) >= shards
        )
        if name.endswith(".tmp") or stale_shard:
            path.unlink()


def _manifest(settings, counts, writer: _ShardWriter, tokenizer_path, rdtype) -> dict:
    seq_len = settings["seq_len"]
    return {
        "format": store.FORMAT,
        "version": store.VERSION,
        "seq_len": seq_len,
        "vocab_size": settings["vocab_size"],
        "token_dtype": rdtype["tokens"].base.name,
        "row_bytes": rdtype.itemsize,
        "rows_per_shard": settings["rows_per_shard"],
        "rows": writer.rows,
        "tokens": writer.tokens,
        "documents": counts["documents"],
        "skipped": {"missing_field": counts["missing"], "empty": counts["empty"]},
        "padding_fraction": store.padding_fraction(writer.tokens, writer.rows, seq_len),
        "pack": settings["pack"],
        "tokenizer": {
            "file": os.path.basename(tokenizer_path),
            "sha256": settings["tokenizer_sha256"],
            "vocab_size": settings["vocab_size"],
            "bos_id": settings["bos_id"],
            "eos_id": settings["eos_id"],
        },
        "add_bos": settings["add_bos"],
        "add_eos": settings["add_eos"],
        "inputs": settings["inputs"],
        "shards": writer.shards,
        "settings": settings,
    }


def _write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes `path` so that it never holds part of `data`: under `<name>.tmp`, renamed when
    complete. An object store (gs://) publishes an object only once its upload is complete, and
    renames there are copies, so objects are written in place."""
    if "://" in str(path):
        path.write_bytes(data)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
