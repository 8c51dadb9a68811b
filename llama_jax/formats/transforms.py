"""Directory-to-directory transforms of models: converting a Hugging Face directory,
exporting any model directory to Hugging Face, quantizing, pruning, and merging a LoRA
run onto its base.

Each reads its source with `model_dir` (any kind of model directory), checks
everything before writing, and writes its output with `dir_writer` (under a temporary
name, renamed when complete).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llama_jax import compress, nn, paths, sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats.dir_writer import (
    EXPORT_MARKER,
    check_out_dir,
    default_generation_config,
    fresh_tmp,
    handed_out,
    replace_dir,
    write_model_dir,
)
from llama_jax.formats.hf import keymap
from llama_jax.formats.hf.layout import (
    HFReader,
    hf_shape,
    hf_tensor_names,
    layout_dims,
    project_to_hf,
)
from llama_jax.formats.hf.safetensors_file import write_safetensors
from llama_jax.formats.model_dir import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    ModelDir,
    tokenizer_files,
)
from llama_jax.tree import flatten

DTYPES = ("bfloat16", "float32", "float16")


def convert_hf(
    hf_dir,
    out_dir,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    dtype: str = "auto",
    overwrite: bool = False,
    quantize: str | None = None,
    quantize_head: bool = False,
    quantize_embed: bool = False,
    progress=None,
) -> epath.Path:
    """Converts a Hugging Face LLaMA directory into a converted model directory.

    dtype: 'auto' keeps the checkpoint's own float dtype (float64 becomes float32), or
    one of DTYPES. Each parameter is built on `mesh` with every host reading only the
    slices its devices hold, then saved by every host (its own shards) while the next
    is read. All checks (config, every tensor's presence, dtype and shape, tokenizer,
    output directory) run before anything is written. progress: an object with
    `start(total_tensors, total_bytes)` and `update(tensors, nbytes)` (source bytes).
    quantize: 'int8' quantizes the block projections while converting (each output
    channel's scale comes from its whole HF row, streamed first; then every host
    quantizes only its slices), bitwise equal to converting and then `quantize_dir`;
    quantize_head / quantize_embed add the LM head / embedding table.
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[hf_dir])
    hf_dir = paths.absolute(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory")
    reader = HFReader(str(hf_dir))
    files = tokenizer_files(hf_dir)
    if not any(name in files for name in TOKENIZER_FILES[:2]):
        raise CheckpointError(
            f"{hf_dir} has no tokenizer: expected {TOKENIZER_FILES[0]} or {TOKENIZER_FILES[1]}"
        )
    source_dtype = reader.dtype()
    if dtype == "auto":
        dtype = "float32" if source_dtype == np.float64 else str(source_dtype)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    qopts = quant_options(reader.config, quantize, quantize_head, quantize_embed)
    _, abstract = nn.abstract_params(
        reader.config, mesh, rules, dtype=jnp.dtype(dtype), **compress.model_kwargs(**qopts)
    )
    targets = set(compress.quantized_paths(head=quantize_head, embed=quantize_embed))
    names = [n for n in flatten(abstract) if not n.endswith(compress.SCALE_SUFFIX)]
    reader.check(names)
    if progress is not None:
        progress.start(len(names), sum(reader.nbytes(n) for n in names))
    scales: dict[str, np.ndarray] = {}

    def scale_of(kernel: str) -> np.ndarray:
        if kernel not in scales:
            absmax = reader.row_absmax(kernel)
            scales[kernel] = np.where(absmax > 0, absmax * compress.INV_127, np.float32(1))
        return scales[kernel]

    def read(name, index, dt):
        if name.endswith(compress.SCALE_SUFFIX):
            return np.ascontiguousarray(scale_of(name[: -len(compress.SCALE_SUFFIX)])[index])
        if quantize is None or name not in targets:
            return reader.read(name, index, dt)
        axes = compress.reduce_axes(name)
        w = reader.read(name, index, np.float32)
        s = scale_of(name)[tuple(ix for a, ix in enumerate(index) if a not in axes)]
        s = np.expand_dims(s, axes)
        return np.clip(np.rint(w / s), -127, 127).astype(np.int8)

    def arrays():
        for name, array in sharding.sharded_arrays(abstract, read):
            reader.release()
            yield name, array
            # Not held while the next one is read (with the host copy Orbax keeps).
            del array

    return write_model_dir(
        out_dir,
        reader.config,
        arrays(),
        metadata={
            "source": {"kind": "huggingface", "path": str(hf_dir.resolve())},
            "source_dtype": str(source_dtype),
            "dtype": dtype,
            **_quant_metadata(qopts),
        },
        files=files,
        overwrite=overwrite,
        on_param=None
        if progress is None
        else lambda n, _: progress.update(
            0 if n not in names else 1, reader.nbytes(n) if n in names else 0
        ),
    )


def export_hf(
    path,
    out_dir,
    *,
    dtype: str = "auto",
    max_shard_size: int = 5 * 10**9,
    tokenizer: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> epath.Path:
    """Writes the model in any kind of model directory (a path or a ModelDir) as a
    Hugging Face directory:
    sharded safetensors with an index, a transformers config.json, generation_config.json
    and the tokenizer files.

    Streams one parameter at a time (restored on the host, split into its per-layer
    tensors, written). dtype: 'auto' keeps each tensor's stored dtype, or one of DTYPES.
    tokenizer: a directory or tokenizer file to ship (default: the model's own). Runs
    on one process; written under a temporary name and renamed when complete.
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[path, tokenizer])
    source = ModelDir.open(path)
    config = source.config
    if source.quantization is not None:
        raise CheckpointError(
            f"{source} is quantized ({source.quantization}); export the float model it was "
            "made from (transformers has no matching int8 LLaMA layout)"
        )
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    files = _export_tokenizer_files(source, tokenizer or source.tokenizer_path)
    stored = source.stored_dtypes
    dims = layout_dims(config)
    entries = []
    for name in stored:
        out_dtype = np.dtype(stored[name] if dtype == "auto" else jnp.dtype(dtype))
        _, hf_layout, _ = keymap.PARAMS[name]
        for tensor in hf_tensor_names(name, config):
            entries.append((tensor, hf_shape(hf_layout, dims), out_dtype))
    if progress is not None:
        progress.start(len(stored), sum(math.prod(e[1]) * e[2].itemsize for e in entries))
    out_dtypes = {e[0]: e[2] for e in entries}

    def tensors():
        for name, array in source.iter_host_params():
            hf_name, hf_layout, proj_layout = keymap.PARAMS[name]
            names = hf_tensor_names(name, config)
            parts = list(array) if "{i}" in hf_name else [array]
            nbytes = 0
            for tensor, part in zip(names, parts, strict=True):
                out = project_to_hf(part, hf_layout, proj_layout, dims)
                out = np.ascontiguousarray(out.astype(out_dtypes[tensor], copy=False))
                nbytes += out.nbytes
                yield tensor, out
            if progress is not None:
                progress.update(1, nbytes)

    tmp = fresh_tmp(out_dir)
    write_safetensors(str(tmp), entries, tensors(), max_shard_size)
    hf_config = config.to_hf()
    float_dtype = next(iter(out_dtypes.values())) if out_dtypes else np.dtype(np.float32)
    hf_config["dtype"] = str(jnp.dtype(float_dtype))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for dest, src in files.items():
        shutil.copyfile(src, tmp / dest)
    if GENERATION_CONFIG not in files:
        (tmp / GENERATION_CONFIG).write_text(
            json.dumps(default_generation_config(config), indent=2) + "\n"
        )
    marker = {"format": "llama_jax.hf_export", "source": str(source.path)}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


def _export_tokenizer_files(model: ModelDir, source: str | None) -> dict[str, str]:
    """The tokenizer files to ship with `model`'s export, from `source` (a tokenizer
    directory or file)."""
    if source is None:
        raise CheckpointError(
            f"{model} has no tokenizer to ship with the export; pass one with --tokenizer"
        )
    source = paths.absolute(source)
    if source.is_dir():
        files = tokenizer_files(source)
        if not any(name in files for name in TOKENIZER_FILES[:2]):
            raise CheckpointError(
                f"{source} has no {TOKENIZER_FILES[0]} or {TOKENIZER_FILES[1]} to ship"
            )
        return files
    if not source.exists():
        raise CheckpointError(f"tokenizer {source} does not exist")
    name = TOKENIZER_FILES[1] if source.suffix == ".model" else TOKENIZER_FILES[0]
    files = {name: str(source)}
    siblings = tokenizer_files(source.parent)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if extra in siblings:
            files[extra] = siblings[extra]
    return files


def quantize_dir(
    path,
    out_dir,
    *,
    mode: str = "int8",
    quantize_head: bool = False,
    quantize_embed: bool = False,
    mesh,
    rules=sharding.DEFAULT_RULES,
    tokenizer: str | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> epath.Path:
    """Writes a quantized model directory from any float model directory (a path or a
    ModelDir).

    The float parameters are read into their shards on `mesh`, quantized there by one
    jitted function whose outputs carry the quantized model's shardings, and written one
    parameter at a time. Norms, the embedding and the LM head keep their stored dtype.
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[path, tokenizer])
    source = ModelDir.open(path)
    config = source.config
    qopts = quant_options(config, mode, quantize_head, quantize_embed)
    files, float_dtype, float_abstract = float_source(source, tokenizer, mesh, rules, "quantize")
    params = source.load_params(float_abstract)
    _, q_abstract = nn.abstract_params(
        config, mesh, rules, dtype=float_dtype, **compress.model_kwargs(**qopts)
    )
    q_params = jax.jit(
        lambda p: compress.quantize_params(p, head=quantize_head, embed=quantize_embed),
        out_shardings=jax.tree.map(lambda x: x.sharding, q_abstract),
    )(params)
    del params
    arrays = handed_out(q_params)
    del q_params
    return write_model_dir(
        out_dir,
        config,
        arrays,
        metadata={
            "source": {"kind": source.kind, "path": str(source.path.resolve())},
            "dtype": str(float_dtype),
            "sparsity": source.sparsity,
            **_quant_metadata(qopts),
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )


def prune_dir(
    path,
    out_dir,
    cfg: compress.PruneConfig,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    tokenizer: str | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> tuple[epath.Path, dict[str, Any]]:
    """One-shot magnitude pruning of any float model directory (a path or a ModelDir)
    into a converted one.

    The parameters are read into their shards on `mesh`; the masks for `cfg`'s final
    sparsity are computed there (no array is gathered) and applied, and the result is
    written one parameter at a time with metadata.json "sparsity" (pattern, scope,
    overall and per-layer fractions). Returns (out_dir, that sparsity record).
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[path, tokenizer])
    source = ModelDir.open(path)
    config = source.config
    files, dtype, abstract = float_source(source, tokenizer, mesh, rules, "prune")
    pruned = compress.pruned_paths(cfg, abstract)
    params = source.load_params(abstract)
    last = len(cfg.points()) - 1

    def apply(p):
        masks = compress.compute_masks(cfg, p, pruned, last)
        return compress.apply_masks(p, masks, p), masks

    params, masks = jax.jit(apply, donate_argnums=0)(params)
    report = compress.sparsity_report(masks)
    del masks
    record = {
        "pattern": cfg.pattern,
        "scope": cfg.scope,
        "target": cfg.final_sparsity,
        "include": cfg.include,
        "overall": report["sparsity"],
        "per_layer": [v for k, v in sorted(report.items()) if k.startswith("sparsity/")],
    }
    arrays = handed_out(params)
    del params
    out = write_model_dir(
        out_dir,
        config,
        arrays,
        metadata={
            "source": {"kind": source.kind, "path": str(source.path.resolve())},
            "dtype": str(dtype),
            "sparsity": record,
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )
    return out, record


def merge_lora_dir(
    path,
    out_dir,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    dtype: str = "auto",
    base_dir=None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> epath.Path:
    """Writes a LoRA run merged onto its base as a converted (float) model directory.

    base_dir: where the base is now, if it moved since training (its fingerprint must
    match either way). dtype: 'auto' (the base's float dtype) or one of DTYPES. The
    merged parameters are built in their shards on `mesh` and written one at a time.
    """
    out_dir = check_out_dir(out_dir, overwrite, inputs=[path, base_dir, tokenizer])
    run = ModelDir.open(path)
    info = run.lora
    if info is None:
        raise CheckpointError(
            f"{run} is not a LoRA run: its checkpoint metadata has no 'lora' entry"
        )
    base = run.base(base_dir)
    check_out_dir(out_dir, overwrite, inputs=[base.path])
    config = run.config
    if dtype == "auto":
        dtype = str(base.stored_float_dtype)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    files = _export_tokenizer_files(run, tokenizer or run.tokenizer_path or base.tokenizer_path)
    _, abstract = nn.abstract_params(config, mesh, rules, dtype=jnp.dtype(dtype))
    return write_model_dir(
        out_dir,
        config,
        handed_out(run.load_params(abstract, base_dir=base.path)),
        metadata={
            "source": {"kind": "lora", "path": str(run.path.resolve()), "base": str(base)},
            "dtype": dtype,
            "lora": {k: v for k, v in info.items() if k != "base"},
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )


def float_source(source: ModelDir, tokenizer, mesh, rules, verb: str):
    """What a transform of the float model `source` starts from: (tokenizer files to
    ship, the stored float dtype, abstract parameters in it on `mesh`). A quantized
    source is refused: `verb` its float source instead."""
    already = source.quantization
    if already is not None:
        raise CheckpointError(f"{source} is already quantized ({already}); {verb} its float source")
    dtype = source.stored_dtypes["embed.embedding"]
    _, abstract = nn.abstract_params(source.config, mesh, rules, dtype=dtype)
    return _export_tokenizer_files(source, tokenizer or source.tokenizer_path), dtype, abstract


def quant_options(config: LlamaConfig, mode, head: bool, embed: bool) -> dict[str, Any]:
    """Checked `compress.model_kwargs` arguments."""
    if mode is None:
        if head or embed:
            raise CheckpointError("quantize_head / quantize_embed need a quantization mode")
        return {}
    compress.check_mode(mode)
    if head and config.tie_word_embeddings:
        raise CheckpointError(
            "quantize_head: this model ties its LM head to the embedding; use quantize_embed"
        )
    return dict(quantization=mode, quantize_head=head, quantize_embed=embed)


def _quant_metadata(qopts: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        quantization=qopts.get("quantization"),
        quantized_head=bool(qopts.get("quantize_head")),
        quantized_embed=bool(qopts.get("quantize_embed")),
    )
