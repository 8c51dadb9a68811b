"""Corpus files: finding them (paths, directories and globs, local or gs://) and reading
their documents as strings, streamed.

Formats (`find_inputs`' `format`, or "auto": from each file's name):
  jsonl    one JSON object per line, the document in `field`; `.jsonl`, `.ndjson`, and either
           compressed as `.gz` or `.zst`
  parquet  the string column `field`; `.parquet`
  text     documents separated by blank lines (`.txt`, `.text`, `.md`, also `.gz` / `.zst`); a
           directory of `.txt` files is one document per file
  arrow    a Hugging Face `datasets` `save_to_disk` directory: its `*.arrow` files (Arrow IPC
           streams) in the order its state.json lists them, the column `field`; or one .arrow
           file

A record without a string `field` (absent, null, another type) is counted and skipped, or
refused when `strict`; empty documents are counted and skipped. Bytes that are not UTF-8, a
truncated or damaged .gz/.zst file, and an unreadable Parquet or Arrow file are DataErrors
naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from etils import epath
from etils.epath import backend as epath_backend

from llama_jax.data.jsonl import check_text
from llama_jax.errors import DataError

FORMATS = ("jsonl", "parquet", "text", "arrow")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".arrow": "arrow",
}
_COMPRESSED = (".gz", ".zst")
_BLOCK = 1 << 20
_GLOB_CHARS = "*?["
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: `path` as found, its `format`, its total `bytes`, and the `files` read for it
    (the path itself, or a directory's files in reading order)."""

    path: str
    format: str
    bytes: int
    files: tuple[str, ...]
    directory: bool = False

    @property
    def compressed(self) -> bool:
        return self.path.endswith(_COMPRESSED)


@dataclasses.dataclass
class ReadStats:
    """What reading has seen so far: documents given, records skipped (and where the first
    one was), bytes of the files read."""

    documents: int = 0
    missing: int = 0
    empty: int = 0
    bytes_read: int = 0
    first_missing: str = ""

    def skip_missing(self, where: str, field: str, strict: bool, found: str) -> None:
        if strict:
            raise DataError(
                f"{where}: no string {field!r} ({found}); without --strict such records are "
                "counted and skipped"
            )
        self.missing += 1
        self.first_missing = self.first_missing or where


def find_inputs(specs: Sequence[str], format: str = "auto") -> list[Source]:
    """The inputs that `specs` (paths, directories or globs, local or gs://) name, in order,
    each file once."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"input format {format!r} is unknown; expected auto or one of {FORMATS}")
    if not specs:
        raise DataError("no inputs given")
    sources, seen = [], set()
    for spec in specs:
        for path in _expand(spec):
            if path not in seen:
                seen.add(path)
                sources.append(_source(path, format))
    return sources


def documents(source: Source, field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    """The documents of `source`, in file order; updates `stats` as it goes."""
    for file in source.files:
        if source.format == "jsonl":
            docs = _jsonl(file, field, stats, strict)
        elif source.format == "text":
            docs = _text_file(file, stats) if not source.directory else _whole_file(file, stats)
        elif source.format == "parquet":
            docs = _parquet(file, field, stats, strict)
        else:
            docs = _arrow(file, field, stats, strict)
        for doc in docs:
            if doc:
                stats.documents += 1
                yield doc
            else:
                stats.empty += 1


def _expand(spec: str) -> list[str]:
    spec = spec.strip()
    remote = "://" in spec
    if any(c in spec for c in _GLOB_CHARS):
        if remote:
            found = epath_backend.fsspec_backend.glob(spec)
        else:
            found = glob.glob(spec, recursive=True)
        found = sorted(p for p in found if not os.path.basename(p).startswith("."))
        if not found:
            raise DataError(f"no input matches {spec!r}")
        return [p if remote else os.path.abspath(p) for p in found]
    if not epath.Path(spec).exists():
        raise DataError(f"input {spec!r} does not exist")
    return [spec.rstrip("/") if remote else os.path.abspath(spec)]


def _format_of(path: str) -> str | None:
    name = os.path.basename(path).lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _SUFFIXES.get(os.path.splitext(name)[1])


def _source(path: str, format: str) -> Source:
    p = epath.Path(path)
    if p.is_dir():
        return _directory(path, format)
    fmt = _format_of(path) if format == "auto" else format
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path!r} from its name; pass --format (one of {FORMATS})"
        )
    if fmt in ("parquet", "arrow") and path.endswith(_COMPRESSED):
        raise DataError(f"{path}: {fmt} files are read uncompressed; decompress it first")
    return Source(path, fmt, p.stat().length, (path,))


def _directory(path: str, format: str) -> Source:
    d = epath.Path(path)
    names = sorted(f.name for f in d.iterdir())
    if "dataset_dict.json" in names:
        splits = [n for n in names if (d / n).is_dir()]
        raise DataError(
            f"{path} is a DatasetDict (splits {splits}); name one split's directory, e.g. "
            f"{path}/{splits[0] if splits else 'train'}"
        )
    arrow = [n for n in names if n.endswith(".arrow")]
    text = [n for n in names if n.endswith(".txt")]
    if arrow and format in ("auto", "arrow"):
        state = d / "state.json"
        if state.exists():
            try:
                listed = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{state} is not a datasets state.json: {e!r}") from e
            missing = sorted(set(listed) - set(arrow))
            if missing:
                raise DataError(f"{path}: state.json lists {missing}, which are not there")
            arrow = listed
        files = tuple(f"{path}/{n}" for n in arrow)
        return Source(path, "arrow", _size(files), files, directory=True)
    if text and format in ("auto", "text"):
        files = tuple(f"{path}/{n}" for n in text)
        return Source(path, "text", _size(files), files, directory=True)
    raise DataError(
        f"{path} is a directory without .arrow files (a datasets save_to_disk directory) or .txt "
        "files (one document each); name its files instead, e.g. with a glob"
    )


def _size(files: Sequence[str]) -> int:
    return sum(epath.Path(f).stat().length for f in files)


def _chunks(path: str, stats: ReadStats) -> Iterator[bytes]:
    """The file's bytes in blocks, decompressed when its name ends in .gz or .zst; a damaged or
    truncated compressed file is a DataError."""
    kind = next((s for s in _COMPRESSED if path.endswith(s)), None)
    with epath.Path(path).open("rb") as f:
        if kind is None:
            for block in iter(lambda: f.read(_BLOCK), b""):
                stats.bytes_read += len(block)
                yield block
            return
        make = (
            (lambda: zlib.decompressobj(31))
            if kind == ".gz"
            else (lambda: zstandard.ZstdDecompressor().decompressobj())
        )
        stream, fed = make(), False
        try:
            for block in iter(lambda: f.read(_BLOCK), b""):
                stats.bytes_read += len(block)
                # A file may hold several members (gzip) or frames (zstd) back to back.
                while block:
                    fed = True
                    out = stream.decompress(block)
                    if out:
                        yield out
                    if stream.eof:
                        block = stream.unused_data
                        stream, fed = make(), False
                    else:
                        block = b""
        except (zlib.error, zstandard.ZstdError) as e:
            raise DataError(f"{path} is damaged ({kind[1:]}: {e})") from e
        if fed and not stream.eof:
            raise DataError(f"{path} is truncated: its {kind[1:]} stream ends early")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (without their newline) of a stream of blocks."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]]
    tail = b"".join(pending)
    if tail:
        yield tail


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e})") from e


def _jsonl(path: str, field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    for line_no, raw in enumerate(_lines(_chunks(path, stats)), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(_utf8(raw, where))
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: not a valid JSON line ({e})") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = record.get(field)
        if isinstance(text, str):
            # Only an escape can produce a surrogate: look for one before checking the text.
            yield check_text(text, where) if _SURROGATE_ESCAPE.search(raw) else text
        else:
            found = "absent" if field not in record else f"{type(text).__name__}"
            stats.skip_missing(where, field, strict, f"{found}; keys {sorted(record)[:8]}")


def _text_file(path: str, stats: ReadStats) -> Iterator[str]:
    """Blocks of lines separated by blank (empty or whitespace-only) lines."""
    doc: list[str] = []
    for line_no, raw in enumerate(_lines(_chunks(path, stats)), 1):
        line = _utf8(raw, f"{path}:{line_no}").removesuffix("\r")
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _whole_file(path: str, stats: ReadStats) -> Iterator[str]:
    raw = b"".join(_chunks(path, stats))
    yield _utf8(raw, path).replace("\r\n", "\n").strip("\n")


def _column_values(
    batch: pa.RecordBatch | pa.Table, field: str, where: str, stats: ReadStats, strict: bool
) -> Iterator[str]:
    """The strings of column `field`; null entries are missing records."""
    column = batch.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: column {field!r} holds {column.type}; expected strings")
    for i, text in enumerate(column.to_pylist()):
        if text is None:
            stats.skip_missing(f"{where} record {i}", field, strict, "null")
        else:
            yield text


def _parquet(path: str, field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    size = epath.Path(path).stat().length
    start = stats.bytes_read
    with epath.Path(path).open("rb") as f:
        try:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if field not in names:
                for i in range(parquet.metadata.num_rows):
                    stats.skip_missing(f"{path} record {i}", field, strict, f"columns {names}")
                stats.bytes_read = start + size
                return
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=[field])
                stats.bytes_read = start + size * (group + 1) // parquet.num_row_groups
                yield from _column_values(table, field, f"{path} row group {group}", stats, strict)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    stats.bytes_read = start + size


def _arrow(path: str, field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    start = stats.bytes_read
    with epath.Path(path).open("rb") as f:
        try:
            try:
                reader = pa.ipc.open_stream(f)
                batches = iter(reader)
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            names = reader.schema.names
            for number, batch in enumerate(batches):
                stats.bytes_read = start + f.tell()
                if field not in names:
                    for i in range(batch.num_rows):
                        where = f"{path} batch {number} record {i}"
                        stats.skip_missing(where, field, strict, f"columns {names}")
                    continue
                yield from _column_values(batch, field, f"{path} batch {number}", stats, strict)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path} is not a readable Arrow IPC file: {e}") from e
