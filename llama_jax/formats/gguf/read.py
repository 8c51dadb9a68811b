"""Reading a LLaMA GGUF file into a converted model directory: `import_gguf`.

The file's metadata gives the config (`gguf_model.config_from_metadata`) and the
tokenizer files (`gguf_vocab`); every tensor is checked for presence, shape and type
before anything is written. Each parameter is then built in its shards on the mesh from
the memory-mapped file, one layer's tensor at a time (quantized blocks dequantized by
the `gguf` package, llama.cpp's row order undone, `gguf_model.from_gguf`), and written
by `dir_writer.write_model_dir` under a temporary name, renamed when complete.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Sequence
from typing import Any

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from llama_jax import nn, paths, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import Tokenizer
from llama_jax.errors import CheckpointError, DataError
from llama_jax.formats.dir_writer import check_out_dir, write_model_dir
from llama_jax.formats.gguf import tensors
from llama_jax.formats.gguf import tokenizer as gguf_tokenizer
from llama_jax.formats.gguf import vocab as gguf_vocab
from llama_jax.tree import flatten

Q = gguf.GGMLQuantizationType
# The tensor types an import reads: floats, and the block types the gguf package
# dequantizes that llama.cpp's LLaMA files use.
FLOAT_TYPES = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16)}
FLOAT_TYPES[Q.BF16] = np.dtype(ml_dtypes.bfloat16)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
DTYPES = ("bfloat16", "float32", "float16")


class GGUFFile:
    """A GGUF file, memory-mapped: its metadata (`get`), tensor shapes, and tensors."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise CheckpointError(f"GGUF file {self.path} is a directory, expected a file")
        if not os.path.isfile(self.path):
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OverflowError, struct.error) as e:
            raise CheckpointError(
                f"{self.path} is not a readable GGUF file ({e}); is it truncated or damaged?"
            ) from e
        size = os.path.getsize(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, "
                    f"but the file has {size}; it is truncated"
                )
        arch = self.get(gguf.Keys.General.ARCHITECTURE)
        if arch != tensors.ARCH:
            raise CheckpointError(
                f"{self.path}: general.architecture={arch!r}; llama_jax imports LLaMA-"
                f"architecture files ({tensors.ARCH!r})"
            )
        self._cached: tuple[str, np.ndarray] | None = None

    def get(self, key: str) -> Any:
        """A metadata value (int, float, bool, str or list), or None if absent."""
        field = self.reader.fields.get(key)
        return None if field is None else field.contents()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape in numpy order ([out, in] for a matrix)."""
        return {
            n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self.tensors.items()
        }

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` in numpy order: a read-only view of the file for F32 / F16 /
        BF16, a new float32 array for block types."""
        t = self.tensors[name]
        if t.tensor_type == Q.BF16:
            return t.data.view(ml_dtypes.bfloat16)
        if t.tensor_type in FLOAT_TYPES:
            return t.data
        return gguf.quants.dequantize(t.data, t.tensor_type)

    def check(self, config: LlamaConfig, params: Sequence[str]) -> None:
        """Every tensor of `config`'s model is present with its shape and a readable
        type, and the file holds nothing else."""
        shapes, wanted = self.shapes(), {}
        for param in params:
            for name in tensors.tensor_names(param, config):
                wanted[name] = tensors.tensor_shape(param, config)
        if tensors.ROPE_FREQS in shapes:
            wanted[tensors.ROPE_FREQS] = (config.head_dim // 2,)
        problems = [f"{n} is missing" for n in wanted if n not in shapes]
        problems += [
            f"{n} has shape {list(shapes[n])}, expected {list(s)}"
            for n, s in wanted.items()
            if n in shapes and shapes[n] != s
        ]
        problems += [f"unexpected tensor {n}" for n in shapes if n not in wanted]
        if problems:
            raise CheckpointError(
                f"{self.path} does not hold a LLaMA of its own metadata's shape: "
                + "; ".join(problems[:8])
                + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            )
        bad = {
            n: t.tensor_type.name for n, t in self.tensors.items() if not readable(t.tensor_type)
        }
        if bad:
            raise CheckpointError(
                f"{self.path}: tensor types {sorted(set(bad.values()))} (e.g. {next(iter(bad))}) "
                f"cannot be imported; supported: "
                f"{[t.name for t in (*FLOAT_TYPES, *BLOCK_TYPES)]}"
            )

    def layer(self, param: str, name: str, config: LlamaConfig) -> np.ndarray:
        """GGUF tensor `name` as one layer of project parameter `param` (project layout,
        e.g. [D, N, H]; float32 for block types). The last one is kept: consecutive
        shards of one layer read it again."""
        if self._cached is None or self._cached[0] != name:
            self._cached = None
            self._cached = (name, tensors.from_gguf(param, self.read(name), config))
        return self._cached[1]

    def read_param(self, config: LlamaConfig, param: str, index, dtype) -> np.ndarray:
        """The slice `index` (a tuple of slices, or None for all) of project parameter
        `param` (project layout, layers stacked: e.g. [L, D, N, H]) as a new array of
        `dtype`."""
        names = tensors.tensor_names(param, config)
        index = tuple(index or ())
        if "{i}" not in tensors.TENSOR_NAMES[param]:
            return np.array(self.layer(param, names[0], config)[index], dtype=dtype)
        layers = range(len(names))[index[0] if index else slice(None)]
        parts = [self.layer(param, names[i], config)[index[1:]] for i in layers]
        out = np.empty((len(parts), *parts[0].shape), dtype)
        for j, part in enumerate(parts):
            out[j] = part
        return out


def readable(kind: Q) -> bool:
    return kind in FLOAT_TYPES or kind in BLOCK_TYPES


def auto_dtype(f: GGUFFile) -> str:
    """The float dtype that holds every tensor of the file exactly: the matrices' own when
    they are all F32, F16 or BF16 (and the 1-D tensors fit it), else float32."""
    matrices = {t.tensor_type for t in f.tensors.values() if len(t.shape) == 2}
    if len(matrices) != 1 or next(iter(matrices)) not in FLOAT_TYPES:
        return "float32"
    dtype = FLOAT_TYPES[next(iter(matrices))]
    for name, t in f.tensors.items():
        if len(t.shape) == 1 and name != tensors.ROPE_FREQS:
            x = np.asarray(f.read(name), np.float32)
            if not np.array_equal(x.astype(dtype).astype(np.float32), x):
                return "float32"
    return str(jnp.dtype(dtype))


def import_gguf(
    gguf_path,
    out_dir,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    dtype: str = "auto",
    overwrite: bool = False,
    progress=None,
) -> epath.Path:
    """Converts a LLaMA GGUF file into a converted model directory (config, params,
    tokenizer files, metadata.json), which every llama_jax command reads.

    dtype: 'auto' stores every value exactly (the file's float type, float32 when it is
    quantized or mixed), or one of DTYPES. Raises CheckpointError (or DataError for the
    vocabulary) before writing anything for a file that is not LLaMA-architecture, is
    truncated, or holds a tensor type outside FLOAT_TYPES and BLOCK_TYPES. progress:
    `start(tensors, bytes)` and `update(tensors, bytes)` (bytes in the file).
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[gguf_path])
    f = GGUFFile(gguf_path)
    shapes = f.shapes()
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{f.path}: tensor 'token_embd.weight' is missing")
    vocab = gguf_vocab.vocab_from_metadata(f.get, shapes["token_embd.weight"][0], f.path)
    special = {k: getattr(vocab, k) for k in ("bos", "eos", "eot", "eom", "pad")}
    config = tensors.config_from_metadata(
        f.get,
        shapes,
        lambda: np.asarray(f.read(tensors.ROPE_FREQS), np.float32),
        special,
        f.path,
    )
    one = sharding.create_mesh(devices=list(mesh.devices.flat)[:1])
    params = list(flatten(nn.abstract_params(config, one)[1]))
    f.check(config, params)
    if dtype == "auto":
        dtype = auto_dtype(f)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    _, abstract = nn.abstract_params(config, mesh, rules, dtype=jnp.dtype(dtype))
    counts: dict[str, int] = {}
    for t in f.tensors.values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    file_bytes = {
        p: sum(f.tensors[n].n_bytes for n in tensors.tensor_names(p, config)) for p in params
    }
    if progress is not None:
        progress.start(len(params), sum(file_bytes.values()))
    with tempfile.TemporaryDirectory() as tmp:
        files = gguf_tokenizer.write_tokenizer_files(vocab, tmp)
        try:
            Tokenizer.from_dir(tmp)
        except (DataError, FileNotFoundError) as e:
            raise DataError(f"{f.path}: the vocabulary does not make a tokenizer ({e})") from e
        return write_model_dir(
            out_dir,
            config,
            sharding.sharded_arrays(abstract, lambda p, i, dt: f.read_param(config, p, i, dt)),
            metadata={
                "source": {
                    "kind": "gguf",
                    "path": str(paths.absolute(f.path)),
                    "file_type": f.get(gguf.Keys.General.FILE_TYPE),
                    "tensor_types": counts,
                    "tokenizer": f"{vocab.model} ({vocab.pre or 'sentencepiece'})",
                },
                "dtype": dtype,
            },
            files=files,
            overwrite=overwrite,
            on_param=None
            if progress is None
            else lambda n, _: progress.update(1, file_bytes.get(n, 0)),
        )
