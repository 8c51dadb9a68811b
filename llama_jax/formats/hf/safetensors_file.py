"""The safetensors weight format: files read with their header validated up front
and tensors memory-mapped or read a block of rows at a time, and directories of them
(one file, or shards with an index, as transformers writes them) written streamed.

Files are read from local disk or any file system etils.epath reads (gs://...): there a
tensor is read by byte range, one request a block, instead of memory-mapped.

Nothing here knows which model the tensors belong to. Only safetensors are read:
pickled weights (.bin, .pth, ...) can execute code when loaded and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath
from etils.epath import backend as epath_backend

from llama_jax.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = tuple(SAFETENSORS_DTYPES[k] for k in ("F64", "F32", "F16", "BF16"))
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Weight formats that unpickle on load, which can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size up front;
    tensors are read-only memory-mapped views, so nothing is read until used."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._remote = "://" in self.path
        size = epath.Path(self.path).stat().length
        with epath.Path(self.path).open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file ({size} bytes, no header)"
                )
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file: header claims "
                    f"{n} bytes, file has {size}"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        regions = []
        for name, entry in header.items():
            try:
                dtype_name, shape = entry["dtype"], entry["shape"]
                begin, end = entry["data_offsets"]
                if not all(isinstance(x, int) and x >= 0 for x in [*shape, begin, end]):
                    raise ValueError(entry)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}; "
                    "expected dtype, shape and data_offsets of non-negative integers"
                ) from e
            if dtype_name not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has dtype {dtype_name}; expected one of "
                    f"{sorted(SAFETENSORS_DTYPES)}"
                )
            dtype = SAFETENSORS_DTYPES[dtype_name]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} {dtype_name}{list(shape)} needs {nbytes} "
                    f"bytes but its offsets span {end - begin}"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                    f"{self._data_start + end}, file has {size}"
                )
            self._entries[name] = (dtype, tuple(shape), begin)
            regions.append((begin, end, name))
        regions.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(regions, regions[1:], strict=False):
            if begin_b < end_a:
                raise CheckpointError(
                    f"{self.path}: corrupt header: tensors {a!r} and {b!r} overlap"
                )
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only, memory-mapped view of one tensor (read whole from a remote file)."""
        dtype, shape, begin = self._entries[name]
        if self._remote:
            if not shape or shape[0] == 0:
                return np.zeros(shape, dtype)
            out = self.read_rows(name, 0, shape[0], bytearray())
            out.flags.writeable = False
            return out
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        raw = self._mmap[start : start + math.prod(shape) * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def read_rows(self, name: str, lo: int, hi: int, buffer: bytearray) -> np.ndarray:
        """Rows [lo, hi) of a tensor's leading axis, read from the file into `buffer`
        (grown as needed and reused), not memory-mapped: streaming readers then hold
        one block, not every page they have touched. The result is a view of `buffer`."""
        dtype, shape, begin = self._entries[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        nbytes = (hi - lo) * row
        if len(buffer) < nbytes:
            buffer.extend(bytes(nbytes - len(buffer)))
        view = memoryview(buffer)[:nbytes]
        start = self._data_start + begin + lo * row
        if self._remote:
            # One ranged request (opening the object would ask for its metadata first).
            fs = epath_backend.fsspec_backend.fs(self.path)
            data = fs.cat_file(self.path, start=start, end=start + nbytes)
            got = len(data)
            view[:got] = data
        else:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                got = f.readinto(view)
        if got != nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is cut short (file changed while reading?)"
            )
        return np.frombuffer(view, dtype=dtype).reshape((hi - lo, *shape[1:]))

    def close(self) -> None:
        """Unmaps the file. The pages read so far count in this process's RSS until the
        map is gone, so streaming readers close after each tensor they finish."""
        self._mmap = None


def _refuse_pickles(directory: str) -> None:
    names = (p.name for p in epath.Path(directory).iterdir())
    pickles = sorted(f for f in names if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{directory} holds pickled weights ({', '.join(pickles)}) and no safetensors. "
            "Pickle files can run arbitrary code when loaded and are refused; convert them "
            "to safetensors with the tool that wrote them (e.g. save_pretrained(..., "
            "safe_serialization=True))."
        )


def open_safetensors_dir(directory: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to its file, for a single `model.safetensors` or shards
    listed in `model.safetensors.index.json`."""
    index_path = epath.Path(directory) / INDEX_FILE
    single_path = epath.Path(directory) / WEIGHTS_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_path}: expected JSON with a 'weight_map' object ({e})"
            ) from e
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            path = epath.Path(directory) / shard
            if not path.exists():
                raise CheckpointError(f"{index_path} lists shard {shard!r}, which is missing")
            files[shard] = SafetensorsFile(str(path))
        tensors = {}
        for name, shard in weight_map.items():
            if name not in files[shard]._entries:
                raise CheckpointError(
                    f"{index_path} places tensor {name!r} in {shard}, which lacks it"
                )
            tensors[name] = files[shard]
        for shard, f in files.items():
            unlisted = [n for n in f.keys() if weight_map.get(n) != shard]
            if unlisted:
                raise CheckpointError(
                    f"{os.path.join(directory, shard)} holds tensors the index does not place "
                    f"there, e.g. {unlisted[:3]}; the index and shards disagree"
                )
        return tensors
    if single_path.exists():
        f = SafetensorsFile(str(single_path))
        return {name: f for name in f.keys()}
    _refuse_pickles(directory)
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in units:
        raise ValueError(f"size {text!r}; expected a number with an optional unit like 5GB")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return size


def write_safetensors(
    directory: str,
    entries: list[tuple[str, tuple[int, ...], np.dtype]],
    arrays: Iterable[tuple[str, np.ndarray]],
    max_shard_size: int,
) -> list[str]:
    """Streams tensors into safetensors files in `directory`, one tensor in memory at
    a time, the way transformers shards them.

    entries: (name, shape, dtype) of every tensor, in the order `arrays` yields them.
    Tensors are packed in that order into files of at most `max_shard_size` bytes (a
    larger tensor gets a file of its own): `model.safetensors` if one file is enough,
    else `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`.
    Returns the file names.
    """
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = (
        [WEIGHTS_FILE]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    arrays = iter(arrays)
    weight_map = {}
    total = 0
    for file_name, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(os.path.join(directory, file_name), "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name, shape, dtype in shard:
                got_name, array = next(arrays)
                if got_name != name or array.shape != tuple(shape) or array.dtype != dtype:
                    raise CheckpointError(
                        f"expected tensor {name} {np.dtype(dtype)}{list(shape)} next, got "
                        f"{got_name} {array.dtype}{list(array.shape)}"
                    )
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    if n > 1:
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
