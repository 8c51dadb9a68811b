"""Writing any model directory as a GGUF file that llama.cpp (and ollama, LM Studio)
runs: `export_gguf`.

The source is read with `model_dir` (a converted directory, a training or distillation
run, a LoRA run merged on the fly, a pruned or an int8 directory, a Hugging Face one),
one parameter at a time, and each layer's tensor is converted (`gguf_model.to_gguf`),
encoded and appended to the file before the next is read. The `gguf` package writes the
format: the header and every tensor's description first, then the data in that order.

Tensor types per --type, as llama.cpp's converter chooses them: 'f32' everything F32;
'f16' / 'bf16' / 'q8_0' the matrices in that type and the 1-D tensors (norms, biases,
rope_freqs) in F32. Q8_0 packs rows in blocks of 32 values (one float16 scale each): a
matrix whose rows are not a multiple of 32 long stays F16. An int8 directory is
dequantized (q * scale, float32) and packed again as Q8_0 blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

import gguf
import jax
import numpy as np
from absl import logging
from etils import epath

from llama_jax import compress, nn, paths, sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats.gguf import tensors
from llama_jax.formats.gguf import vocab as gguf_vocab
from llama_jax.formats.model_dir import ModelDir
from llama_jax.tree import flatten

Q = gguf.GGMLQuantizationType
TYPES = ("f32", "f16", "bf16", "q8_0")
_MATRIX_TYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_AUTO = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class Entry(NamedTuple):
    """One GGUF tensor of the file being written."""

    name: str  # GGUF name
    param: str  # project parameter path ('' for rope_freqs)
    layer: int | None  # index along the stacked L axis, or None
    shape: tuple[int, ...]  # numpy order, [out, in]
    type: Q


def check_out_file(out, overwrite: bool, *, inputs=()) -> epath.Path:
    """Refuses a remote `out`, one the file system cannot take as a file, one among or
    inside `inputs`, an existing file without `overwrite`, and with it an existing file
    that is not a GGUF file this project wrote."""
    if "://" in str(out):
        raise CheckpointError(f"{out}: GGUF files are written to a local path")
    paths.check_apart(out, inputs, flag="--out")
    out = paths.check_output_file(out, flag="--out")
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"{out} already exists; pass --overwrite to replace it (it is replaced only once "
            "the new file is complete)"
        )
    if out.exists() and not _written_here(out):
        raise CheckpointError(
            f"--out={out} is not a GGUF file this project wrote; --overwrite replaces only "
            "its own outputs: remove it yourself or choose another name"
        )
    return out


def _written_here(path: epath.Path) -> bool:
    try:
        return tensors.CONFIG_KEY in gguf.GGUFReader(os.fspath(path)).fields
    except Exception:  # noqa: BLE001 - any file gguf cannot read is not ours
        return False


def resolve_type(kind: str, stored: dict[str, np.dtype]) -> str:
    """--type 'auto' -> the stored dtype's type (q8_0 for an int8 directory)."""
    if kind == "auto":
        if any(dt == np.int8 for dt in stored.values()):
            return "q8_0"
        return _AUTO[str(np.dtype(stored["final_norm.scale"]))]
    if kind not in TYPES:
        raise CheckpointError(f"type={kind!r}; expected 'auto' or one of {TYPES}")
    return kind


def plan(config: LlamaConfig, params: list[str], kind: str) -> list[Entry]:
    """Every tensor of the file, in the order it is written: the float parameters in
    `params` order, layer by layer, then rope_freqs when the RoPE needs it."""
    entries = []
    for param in params:
        shape = tensors.tensor_shape(param, config)
        ggml = Q.F32 if len(shape) == 1 else _MATRIX_TYPE[kind]
        block = gguf.GGML_QUANT_SIZES[ggml][0]
        if shape[-1] % block:
            ggml = Q.F16
        stacked = "{i}" in tensors.TENSOR_NAMES[param]
        for i, name in enumerate(tensors.tensor_names(param, config)):
            entries.append(Entry(name, param, i if stacked else None, shape, ggml))
    if tensors.rope_freqs(config) is not None:
        entries.append(Entry(tensors.ROPE_FREQS, "", None, (config.head_dim // 2,), Q.F32))
    return entries


def nbytes(entry: Entry) -> int:
    """The tensor's size in the file."""
    return int(np.prod(gguf.quant_shape_to_byte_shape(entry.shape, entry.type)))


def encode(x: np.ndarray, ggml: Q, name: str) -> np.ndarray:
    """One tensor in its GGUF encoding: float32 / float16 values, or the uint8 blocks of
    BF16 / Q8_0 ([rows, bytes per row]) packed by the gguf package."""
    x32 = np.asarray(x, np.float32)
    if ggml == Q.F32:
        return np.ascontiguousarray(x32)
    if ggml == Q.F16:
        out = x32.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(x32).all():
            raise CheckpointError(
                f"{name} has values beyond float16's range (max |x| = "
                f"{float(np.abs(x32).max()):.4g}); export it as bf16 or f32"
            )
        return out
    return gguf.quants.quantize(x32, ggml)


def float_params(source: ModelDir) -> Iterator[tuple[str, np.ndarray]]:
    """`ModelDir.iter_host_params` with every int8 parameter dequantized (q * scale,
    float32) once both parts have arrived."""
    held: dict[str, np.ndarray] = {}
    for name, x in source.iter_host_params():
        if not (name.endswith(compress.SCALE_SUFFIX) or x.dtype == np.int8):
            yield name, x
            continue
        held[name] = x
        base = name.removesuffix(compress.SCALE_SUFFIX)
        if base in held and base + compress.SCALE_SUFFIX in held:
            q, scale = held.pop(base), held.pop(base + compress.SCALE_SUFFIX)
            s = np.expand_dims(scale.astype(np.float32), compress.reduce_axes(base))
            yield base, q.astype(np.float32) * s


def export_gguf(
    path,
    out,
    *,
    kind: str = "auto",
    tokenizer=None,
    overwrite: bool = False,
    progress=None,
) -> epath.Path:
    """Writes the model in any kind of model directory (a path or a ModelDir) as one GGUF
    file for llama.cpp.

    kind: 'auto' (the stored dtype: f32, f16 or bf16, q8_0 for an int8 directory) or one
    of TYPES. tokenizer: a directory or file (default: the model's own). Everything is
    checked before the file is opened; it is written under a temporary name beside `out`
    and renamed when complete. Host memory holds one stored parameter (all its layers)
    and one layer's converted tensor. progress: `start(tensors, bytes)` and
    `update(tensors, bytes)`, as for `transforms.export_hf`.
    """
    out = check_out_file(out, overwrite, inputs=[path, tokenizer])
    model = ModelDir.open(path)
    config = model.config
    tensors.check_exportable(config)
    kind = resolve_type(kind, model.stored_dtypes)
    source = tokenizer or model.tokenizer_path
    if source is None:
        raise CheckpointError(f"{model} has no tokenizer to put in the GGUF file; pass one")
    vocab = gguf_vocab.read_vocab(source, config)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    params = list(flatten(nn.abstract_params(config, mesh)[1]))
    entries = plan(config, params, kind)
    fallback = [e.name for e in entries if len(e.shape) == 2 and e.type != _MATRIX_TYPE[kind]]
    if fallback:
        logging.warning(
            "%d matrices have rows not a multiple of 32 and stay F16, e.g. %s",
            len(fallback),
            fallback[:3],
        )
    if progress is not None:
        progress.start(len(entries), sum(nbytes(e) for e in entries))
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        tmp.unlink()
    writer = gguf.GGUFWriter(os.fspath(tmp), tensors.ARCH)
    try:
        _write(writer, model, config, vocab, entries, kind, progress)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _write(writer, model, config, vocab, entries, kind, progress) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.path.name)
    writer.add_file_type(_FILE_TYPE[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors.write_config(writer, config)
    gguf_vocab.write_vocab(writer, vocab)
    for e in entries:
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), nbytes(e), raw_dtype=e.type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pending = iter(entries)

    def put(entry: Entry, x: np.ndarray) -> None:
        data = encode(x, entry.type, entry.name)
        if data.nbytes != nbytes(entry):
            raise CheckpointError(f"{entry.name}: {data.nbytes} bytes, expected {nbytes(entry)}")
        writer.write_tensor_data(data)
        if progress is not None:
            progress.update(1, data.nbytes)

    # Parameters are written in plan order; one that arrives early waits its turn.
    ready: dict[str, np.ndarray] = {}
    entry = next(pending, None)
    for name, x in float_params(model):
        ready[name] = x
        del x
        while entry is not None and entry.param in ready:
            param = entry.param
            x = ready.pop(param)
            while entry is not None and entry.param == param:
                layer = x if entry.layer is None else x[entry.layer]
                put(entry, tensors.to_gguf(param, layer, config))
                entry = next(pending, None)
            del x
    if entry is not None and entry.name == tensors.ROPE_FREQS:
        put(entry, tensors.rope_freqs(config))
        entry = next(pending, None)
    if entry is not None:
        raise CheckpointError(f"{model}: parameter {entry.param} was never read")
