"""Writing model directories atomically.

`write_model_dir` writes the converted layout `model_dir` reads (config.json, params/,
tokenizer files, generation_config.json, metadata.json) one parameter at a time. Every
directory is written under a temporary name beside its destination and renamed when
complete, so an interrupted or failed write leaves an existing directory as it was.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental import v1 as ocp_v1

from llama_jax import paths
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats.model_dir import GENERATION_CONFIG, METADATA, PARAMS
from llama_jax.tree import flatten, nest

FORMAT = "llama_jax.model"
FORMAT_VERSION = 1


# Written into a Hugging Face directory exported here, so --overwrite knows it is ours.
EXPORT_MARKER = "llama_jax_export.json"


def written_here(directory: epath.Path) -> bool:
    """Whether `directory` is empty or an output this project wrote: a converted model
    directory (its metadata.json names FORMAT) or a Hugging Face export (EXPORT_MARKER)."""
    if not any(directory.iterdir()):
        return True
    if (directory / EXPORT_MARKER).exists():
        return True
    try:
        return json.loads((directory / METADATA).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir, overwrite: bool, *, inputs=(), flag: str = "--out_dir") -> epath.Path:
    """The output directory, absolute, once it is known to be writable as a directory,
    apart from `inputs` (paths the command reads: not one of them, inside one, or
    containing one), and either new or, with `overwrite`, an output of this project
    (`written_here`): anything else is refused, never replaced."""
    paths.check_apart(out_dir, inputs, flag=flag)
    out_dir = paths.check_output_dir(out_dir, flag=flag)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(
            f"{out_dir} already exists; pass --overwrite to replace it (it is replaced only "
            "once the new one is complete)"
        )
    if out_dir.exists() and not written_here(out_dir):
        raise CheckpointError(
            f"{flag}={out_dir} holds files this project did not write (no {METADATA} of a "
            f"converted model, no {EXPORT_MARKER} of an export); --overwrite replaces only "
            "its own outputs: remove it yourself or choose another directory"
        )
    return out_dir


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _tmp_path(out_dir: epath.Path, what: str) -> epath.Path:
    return out_dir.parent / f".{out_dir.name}.{what}"


def replace_dir(tmp: epath.Path, out_dir: epath.Path) -> None:
    """Moves a finished `tmp` to `out_dir`; an existing `out_dir` is removed only after
    the new one is in place (process 0 only)."""
    if jax.process_index() != 0:
        return
    old = _tmp_path(out_dir, "old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp(out_dir: epath.Path) -> epath.Path:
    """An empty temporary directory beside `out_dir` (a leftover one from an interrupted
    write is removed), the same on every process."""
    tmp = _tmp_path(out_dir, "tmp")
    if jax.process_index() == 0:
        for leftover in (tmp, epath.Path(f"{tmp}/{PARAMS}.partial_save")):
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir(parents=True)
    _sync("llama_jax.dir_writer.tmp")
    return tmp


def handed_out(params: Mapping[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    """(dotted path, array) pairs of a nested parameter dict for `write_model_dir`,
    each dropped from the dict as it is handed out: once the caller holds no other
    reference, a written parameter's memory is freed before the next is saved."""
    flat = flatten(params)
    del params
    while flat:
        name = next(iter(flat))
        yield name, flat.pop(name)


def write_model_dir(
    out_dir,
    config: LlamaConfig,
    arrays: Iterable[tuple[str, jax.Array]],
    *,
    metadata: Mapping[str, Any],
    files: Mapping[str, str] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> epath.Path:
    """Writes a converted model directory, one parameter at a time.

    arrays: (dotted parameter path, sharded jax.Array) pairs, produced lazily; each is
      saved (every process writing its own shards) while the next one is produced, so
      at most two parameters are in memory. files: destination name -> source file to
      copy (tokenizer files). generation_config: written as generation_config.json
      unless `files` provides one. metadata: merged into metadata.json.
    Everything is written under a temporary name beside `out_dir` and renamed when
    complete. All processes must call this with the same arguments.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    tmp = fresh_tmp(out_dir)
    files = dict(files or {})
    params_path = tmp / PARAMS
    # Orbax copies each array to host memory while saving it. On accelerators the
    # next parameter is read while the previous one is written; where the devices are
    # the host (CPU) the next is read only once the previous save is done, so at most
    # two copies of one parameter are in memory.
    overlap = jax.devices()[0].platform != "cpu"
    pending = None
    count = 0
    nbytes = 0
    arrays = iter(arrays)
    while True:
        if pending is not None and not overlap:
            pending.result()
            pending = None
        _release_freed_memory()
        try:
            name, array = next(arrays)
        except StopIteration:
            break
        # Partial saves cannot overlap one another.
        if pending is not None:
            pending.result()
        tree = nest({name: array})
        with _save_context():
            pending = ocp_v1.partial.save_async(params_path, tree)
        count += 1
        nbytes += array.size * array.dtype.itemsize
        if on_param is not None:
            on_param(name, array)
        del array, tree
    if pending is not None:
        pending.result()
    if count == 0:
        raise CheckpointError("no parameters to write")
    ocp_v1.partial.finalize(params_path)
    _sync("llama_jax.dir_writer.params")
    if jax.process_index() == 0:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for dest, src in files.items():
            shutil.copyfile(src, tmp / dest)
        if GENERATION_CONFIG not in files:
            gen = dict(generation_config or default_generation_config(config))
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_params": config.num_params(),
            "num_tensors": count,
            "params_bytes": nbytes,
            "quantization": None,
            "sparsity": None,
            **metadata,
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    _sync("llama_jax.dir_writer.files")
    replace_dir(tmp, out_dir)
    _sync("llama_jax.dir_writer.done")
    return out_dir


def _save_context() -> ocp_v1.Context:
    """Orbax options for parameter saves: uncompressed (weights barely compress, and
    zstd costs more time than the bytes it saves) in chunks of at most 64 MiB, so the
    writer's buffers stay small beside the parameter."""
    saving = ocp_v1.options.ArrayOptions.Saving
    storage = saving.StorageOptions(chunk_byte_size=64 * 1024 * 1024)
    ctx = ocp_v1.Context()
    if hasattr(ctx, "array"):  # newer Orbax: options are set on the context
        ctx.array.saving.use_compression = False
        ctx.array.saving.storage_options = storage
        return ctx
    return ocp_v1.Context(
        array_options=ocp_v1.options.ArrayOptions(
            saving=saving(use_compression=False, storage_options=storage)
        )
    )


def _release_freed_memory() -> None:
    """Returns freed heap memory to the system. glibc keeps what Orbax's writer threads
    free in their arenas; without this, each saved parameter leaves up to its size
    behind and the converter's RSS creeps up."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_generation_config(config: LlamaConfig) -> dict[str, Any]:
    eos = list(config.eos_token_ids)
    gen: dict[str, Any] = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return gen
