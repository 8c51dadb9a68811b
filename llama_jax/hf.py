"""Reading Hugging Face model directories: safetensors (memory-mapped, validated) and
`load_hf`, which maps tensors onto the project's parameter tree with the layouts in
`convert/hf_keymap.py`.

Only safetensors are read: pickled weights (.bin, .pth, ...) can execute code when
loaded and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from convert import hf_keymap
from llama_jax import sharding
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.model import Llama


class CheckpointError(ValueError):
    """A model directory or weight file that cannot be loaded as it is."""


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
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size up front;
    tensors are read-only memory-mapped views, so nothing is read until used."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
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
        """A read-only, memory-mapped view of one tensor."""
        dtype, shape, begin = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        raw = self._mmap[start : start + math.prod(shape) * dtype.itemsize]
        return raw.view(dtype).reshape(shape)


def _refuse_pickles(directory: str) -> None:
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(hf_keymap.PICKLE_SUFFIXES))
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
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_path}: expected JSON with a 'weight_map' object ({e})"
            ) from e
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path} lists shard {shard!r}, which is missing")
            files[shard] = SafetensorsFile(path)
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
    if os.path.exists(single_path):
        f = SafetensorsFile(single_path)
        return {name: f for name in f.keys()}
    _refuse_pickles(directory)
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


# --- layouts ---------------------------------------------------------------


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
    name = hf_keymap.PARAMS[path][0]
    if "{i}" in name:
        return [name.format(i=i) for i in range(config.num_layers)]
    return [name]


def _expected_extra(names: Iterable[str], config: LlamaConfig) -> list[str]:
    ignored = {p.format(i=i) for p in hf_keymap.IGNORED for i in range(config.num_layers)}
    if config.tie_word_embeddings:
        ignored.add(hf_keymap.TIED_DUPLICATE)
    return [n for n in names if n not in ignored]


def read_hf_config(hf_dir: str) -> LlamaConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir} has no config.json")
    try:
        return LlamaConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def load_hf(
    hf_dir: str,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    **model_kwargs,
) -> tuple[Llama, LlamaConfig]:
    """Loads a transformers `save_pretrained` LLaMA directory.

    dtype: compute dtype; param_dtype: stored dtype (default: dtype). With a mesh, each
    parameter is placed in its shards as the rules say (one parameter at a time is on
    the host, and no device ever holds a whole model); without, on the default device.
    Other keyword arguments go to `Llama` (scan_layers, remat_policy, attention_impl).
    Returns (model, config). Every tensor is checked for presence and shape before any
    is converted; unknown tensors are an error.
    """
    config = read_hf_config(hf_dir)
    tensors = open_safetensors_dir(hf_dir)
    param_dtype = jnp.dtype(param_dtype or dtype)
    abstract = nnx.eval_shape(
        lambda: Llama(
            config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **model_kwargs
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    dims = layout_dims(config)

    paths = [".".join(str(k) for k in key) for key, _ in flat]
    used: set[str] = set()
    for path in paths:
        if path not in hf_keymap.PARAMS:
            raise CheckpointError(f"parameter {path} has no entry in convert/hf_keymap.py")
        _, hf_layout, _ = hf_keymap.PARAMS[path]
        want = hf_shape(hf_layout, dims)
        for name in hf_tensor_names(path, config):
            if name not in tensors:
                raise CheckpointError(
                    f"{hf_dir}: tensor {name!r} is missing (expected shape {list(want)})"
                )
            got = tensors[name].shape(name)
            got_dtype = tensors[name].dtype(name)
            if got_dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{tensors[name].path}: tensor {name!r} has dtype {got_dtype}; expected a "
                    "floating-point weight (F32, F16 or BF16)"
                )
            if got != want:
                raise CheckpointError(
                    f"{tensors[name].path}: tensor {name!r} has shape {list(got)}; expected "
                    f"{list(want)} for config {hf_layout} with {dims}"
                )
            used.add(name)
    extra = _expected_extra(sorted(set(tensors) - used), config)
    if extra:
        raise CheckpointError(
            f"{hf_dir}: {len(extra)} unexpected tensor(s) for a LLaMA with this config.json, "
            f"e.g. {extra[:5]}"
        )

    for (_, var), path in zip(flat, paths, strict=True):
        hf_name, hf_layout, proj_layout = hf_keymap.PARAMS[path]
        parts = [
            hf_to_project(tensors[n].get(n), hf_layout, proj_layout, dims)
            for n in hf_tensor_names(path, config)
        ]
        array = np.stack(parts) if "{i}" in hf_name else parts[0]
        array = np.asarray(array, dtype=var.get_value().dtype)
        if mesh is None:
            var.set_value(jnp.asarray(array))
        else:
            names = var.get_metadata()["out_sharding"]
            spec = sharding.logical_to_spec(names, array.shape, mesh, rules)
            var.set_value(
                jax.make_array_from_callback(
                    array.shape, NamedSharding(mesh, spec), lambda idx, a=array: a[idx]
                )
            )
    return nnx.merge(graphdef, state), config
