"""Hugging Face LLaMA directories in the project's layout: `HFReader` maps the
safetensors tensors of a transformers `LlamaForCausalLM` directory onto the project's
parameter tree, a slice at a time, with the names and layouts in
`llama_jax/formats/hf/keymap.py`; the layout helpers here also serve the way back. The file
format itself is `llama_jax/formats/hf/safetensors_file.py`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np
from etils import epath

from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats.hf import keymap
from llama_jax.formats.hf.safetensors_file import FLOAT_DTYPES, open_safetensors_dir

# Bytes of a source tensor copied at a time when converting (see HFReader.read).
_BLOCK_BYTES = 64 * 1024 * 1024


def _groups(layout: str) -> list[list[str]]:
    return [list(g.strip("()").split()) for g in re.findall(r"\([^)]*\)|\S+", layout)]


def layout_dims(config: LlamaConfig) -> dict[str, int]:
    c = config
    return dict(
        V=c.vocab_size, D=c.embed_dim, N=c.num_heads, K=c.num_kv_heads, H=c.head_dim, F=c.mlp_dim
    )


def hf_shape(hf_layout: str, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(dims[d] for d in g) for g in _groups(hf_layout))


def hf_to_project(x: np.ndarray, hf_layout: str, proj_layout: str, dims) -> np.ndarray:
    """Splits grouped HF axes and transposes into the project layout."""
    flat = [d for g in _groups(hf_layout) for d in g]
    x = x.reshape([dims[d] for d in flat])
    return x.transpose([flat.index(d) for d in proj_layout.split()])


def project_to_hf(x: np.ndarray, hf_layout: str, proj_layout: str, dims) -> np.ndarray:
    """The inverse of `hf_to_project`."""
    src = proj_layout.split()
    flat = [d for g in _groups(hf_layout) for d in g]
    x = x.transpose([src.index(d) for d in flat])
    return x.reshape(hf_shape(hf_layout, dims))


def hf_tensor_names(path: str, config: LlamaConfig) -> list[str]:
    """The HF tensor name(s) behind one project parameter path (one per layer if stacked)."""
    name = keymap.PARAMS[path][0]
    if "{i}" in name:
        return [name.format(i=i) for i in range(config.num_layers)]
    return [name]


def _expected_extra(names: Iterable[str], config: LlamaConfig) -> list[str]:
    ignored = {p.format(i=i) for p in keymap.IGNORED for i in range(config.num_layers)}
    if config.tie_word_embeddings:
        ignored.add(keymap.TIED_DUPLICATE)
    return [n for n in names if n not in ignored]


def read_hf_config(hf_dir: str) -> LlamaConfig:
    path = epath.Path(hf_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{hf_dir} has no config.json")
    try:
        return LlamaConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(f"{hf_dir}: {e}") from e


class HFReader:
    """The parameters of a Hugging Face LLaMA directory in the project's layout, read a
    slice at a time.

    Every tensor is checked for presence, dtype and shape when the reader is created,
    before anything is converted; unknown tensors are an error. `read(path, index)`
    returns only the requested slice of a project parameter (layers stacked along L),
    touching only the memory-mapped pages behind it.
    """

    def __init__(self, hf_dir: str, config: LlamaConfig | None = None):
        self.hf_dir = os.fspath(hf_dir)
        self.config = config or read_hf_config(self.hf_dir)
        self.tensors = open_safetensors_dir(self.hf_dir)
        self.dims = layout_dims(self.config)
        self._checked: set[str] = set()
        self._buffer = bytearray()

    def check(self, paths: Iterable[str]) -> None:
        """Checks the tensors behind the project parameter `paths` (all of a model's),
        and that the directory holds nothing else."""
        used: set[str] = set()
        for path in paths:
            if path not in keymap.PARAMS:
                raise CheckpointError(
                    f"parameter {path} has no entry in llama_jax/formats/hf/keymap.py"
                )
            _, hf_layout, _ = keymap.PARAMS[path]
            want = hf_shape(hf_layout, self.dims)
            for name in hf_tensor_names(path, self.config):
                if name not in self.tensors:
                    raise CheckpointError(
                        f"{self.hf_dir}: tensor {name!r} is missing (expected shape {list(want)})"
                    )
                f = self.tensors[name]
                if f.dtype(name) not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{f.path}: tensor {name!r} has dtype {f.dtype(name)}; expected a "
                        "floating-point weight (F32, F16 or BF16)"
                    )
                if f.shape(name) != want:
                    raise CheckpointError(
                        f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}; expected "
                        f"{list(want)} for layout {hf_layout} with {self.dims}"
                    )
                used.add(name)
            self._checked.add(path)
        extra = _expected_extra(sorted(set(self.tensors) - used), self.config)
        if extra:
            raise CheckpointError(
                f"{self.hf_dir}: {len(extra)} unexpected tensor(s) for a LLaMA with this "
                f"config.json, e.g. {extra[:5]}"
            )

    def dtype(self) -> np.dtype:
        """The dtype most of the checkpoint's bytes are stored in."""
        sizes: dict[np.dtype, int] = {}
        for name, f in self.tensors.items():
            dt = f.dtype(name)
            sizes[dt] = sizes.get(dt, 0) + math.prod(f.shape(name)) * dt.itemsize
        return max(sizes, key=sizes.get)

    def nbytes(self, path: str) -> int:
        """Bytes on disk behind one project parameter."""
        return sum(
            math.prod(self.tensors[n].shape(n)) * self.tensors[n].dtype(n).itemsize
            for n in hf_tensor_names(path, self.config)
        )

    def read(self, path: str, index: tuple[slice, ...] | None, dtype) -> np.ndarray:
        """The slice `index` of project parameter `path` (all of it for None), as a new
        C-contiguous array of `dtype`."""
        if path not in self._checked:
            raise CheckpointError(f"parameter {path} was not checked before reading")
        hf_name, hf_layout, proj_layout = keymap.PARAMS[path]
        names = hf_tensor_names(path, self.config)
        index = tuple(index or ())

        flat = [d for g in _groups(hf_layout) for d in g]
        proj = proj_layout.split()
        # The first dimension of the HF tensor's leading axis: a block of it is one run
        # of whole rows on disk.
        lead = flat[0]
        axis = proj.index(lead)
        lead_rows = math.prod(self.dims[d] for d in _groups(hf_layout)[0][1:])

        def one(name, rest):
            f = self.tensors[name]
            shape = [self.dims[d] for d in flat]
            rest = rest + (slice(None),) * (len(proj) - len(rest))
            full = [self.dims[d] for d in proj]
            start, stop, _ = rest[axis].indices(full[axis])
            out_shape = [len(range(*r.indices(n))) for r, n in zip(rest, full, strict=True)]
            out = np.empty(out_shape, dtype)
            unit = math.prod(shape[1:]) * f.dtype(name).itemsize
            step = max(1, _BLOCK_BYTES // unit)
            for lo in range(start, stop, step):
                hi = min(lo + step, stop)
                rows = f.read_rows(name, lo * lead_rows, hi * lead_rows, self._buffer)
                block = rows.reshape([hi - lo, *shape[1:]]).transpose([flat.index(d) for d in proj])
                src = list(rest)
                src[axis] = slice(None)
                dst = [slice(None)] * len(proj)
                dst[axis] = slice(lo - start, hi - start)
                out[tuple(dst)] = block[tuple(src)]
            return out

        if "{i}" not in hf_name:
            return one(names[0], index)
        layers = index[0] if index else slice(None)
        rest = index[1:]
        picked = range(len(names))[layers]
        out = None
        for j, i in enumerate(picked):
            part = one(names[i], rest)
            if out is None:
                out = np.empty((len(picked), *part.shape), dtype)
            out[j] = part
        return out

    def row_absmax(self, path: str) -> np.ndarray:
        """float32 max |w| of each row of the HF tensor(s) behind a projection kernel:
        per output channel, as [L, out...] (HF weights are [out, in]). Streamed in blocks
        like `read`."""
        hf_name, hf_layout, _ = keymap.PARAMS[path]
        out_dims = [self.dims[d] for d in _groups(hf_layout)[0]]
        per_layer = []
        for name in hf_tensor_names(path, self.config):
            f = self.tensors[name]
            rows = f.shape(name)[0]
            unit = math.prod(f.shape(name)[1:]) * f.dtype(name).itemsize
            step = max(1, _BLOCK_BYTES // max(unit, 1))
            maxima = [
                np.max(
                    np.abs(f.read_rows(name, lo, min(lo + step, rows), self._buffer)),
                    axis=tuple(range(1, len(f.shape(name)))),
                ).astype(np.float32)
                for lo in range(0, rows, step)
            ]
            per_layer.append(np.concatenate(maxima).reshape(out_dims))
        stacked = np.stack(per_layer)
        return stacked if "{i}" in hf_name else stacked[0]

    def release(self) -> None:
        """Unmaps every file and frees the read buffer."""
        for f in set(self.tensors.values()):
            f.close()
        self._buffer = bytearray()
