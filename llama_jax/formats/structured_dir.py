"""Structured pruning of model directories and runs: the calibration data, the
pruned model directory (weights, metadata.json `structured`, importance.npz), the
directory-to-directory transform `launch.prune --structured` runs, and the pruned
initial student of a prune-then-distil run (`load_or_prune`).

The pruning itself (targets, ranking, slicing) is `structured`'s.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding

from llama_jax import data, paths, sharding
from llama_jax.compress import SCORES_FILE, Pruned, StructuredConfig, prune_params, target_config
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.formats.dir_writer import check_out_dir, handed_out, write_model_dir
from llama_jax.formats.model_dir import TOKENIZER_FILES, ModelDir, load_tokenizer, tokenizer_files


def check_source(source: ModelDir) -> dict[str, Any] | None:
    """Refuses a model directory structured pruning cannot slice (int8, a LoRA run);
    returns its magnitude-pruning record (metadata 'sparsity'), or None."""
    if source.quantization is not None:
        raise CheckpointError(
            f"{source} is quantized ({source.quantization}); structured pruning needs the "
            "float model it was made from"
        )
    if source.lora is not None:
        raise CheckpointError(
            f"{source} is a LoRA run; merge it first (python -m launch.merge_lora) and prune "
            "the merged model"
        )
    return source.sparsity


def calibration_batches(
    spec: StructuredConfig,
    tokenizer,
    mesh,
    rules=sharding.DEFAULT_RULES,
    *,
    vocab_size: int,
    run_data: data.DataConfig | None = None,
) -> list[dict[str, jax.Array]]:
    """The calibration batches, dicts of int32[B, T] arrays on `mesh` (B =
    calibration_batch_size, T = calibration_seq_len). Without calibration_data, the
    run's data (`run_data`) is read. Raises DataError when there is no data or it holds
    fewer rows than asked, before any weights are read."""
    path, fmt, field = calibration_source(spec, run_data)
    b, t = spec.calibration_batch_size, spec.calibration_seq_len
    config = data.DataConfig(path=path, format=fmt, field=field, seq_len=t, global_batch=b)
    batch_sh = NamedSharding(
        mesh, sharding.logical_to_spec(("batch", "length"), (b, t), mesh, rules)
    )
    try:
        iterator = data.DataIterator(config, tokenizer, batch_sh, vocab_size=vocab_size)
    except DataError as e:
        raise DataError(f"calibration data: {e}") from e
    need = spec.calibration_batches * b
    if iterator.num_rows < need:
        raise DataError(
            f"calibration data {path} makes {iterator.num_rows} rows of {t} tokens "
            f"({iterator.num_rows * t} tokens); {spec.calibration_batches} batches of {b} "
            f"rows ask for {need} rows ({need * t} tokens). Give more data or fewer "
            "calibration batches"
        )
    return [next(iterator) for _ in range(spec.calibration_batches)]


def calibration_source(
    spec: StructuredConfig, run_data: data.DataConfig | None = None
) -> tuple[str, str, str]:
    """(path, format, JSONL field) of the calibration data: calibration_data (format
    from its suffix unless given), else the run's data. DataError when there is none."""
    if spec.calibration_data:
        path = spec.calibration_data
        if epath.Path(path).is_dir():
            raise DataError(
                f"calibration_data={path} is a directory, expected a text, JSONL or .npy "
                "tokens file"
            )
        suffix = epath.Path(path).suffix
        guess = {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}.get(suffix, "text")
        return path, spec.calibration_format or guess, spec.calibration_field
    if run_data is not None and run_data.path:
        return run_data.path, run_data.format, run_data.field
    raise DataError(
        "structured pruning ranks by activations on calibration data; give "
        "calibration_data (--calibration_data: a text, JSONL or .npy tokens file)"
    )


def save_pruned(
    out_dir,
    pruned: Pruned,
    *,
    metadata: Mapping[str, Any],
    files: Mapping[str, str] | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> epath.Path:
    """Writes the pruned model as a converted model directory (atomically): its
    parameters, metadata.json with `structured` (`Pruned.record()`) beside `metadata`,
    and importance.npz (every score and kept index, float32 / int32)."""
    if pruned.params is None:
        raise ValueError("a dry-run result has no parameters to save")
    with tempfile.TemporaryDirectory() as tmp:
        scores_path = os.path.join(tmp, SCORES_FILE)
        np.savez(scores_path, **pruned.scores.arrays(), **pruned.kept.arrays())
        return write_model_dir(
            out_dir,
            pruned.config,
            handed_out(pruned.params),
            metadata={**metadata, "sparsity": None, "structured": pruned.record()},
            files={**(files or {}), SCORES_FILE: scores_path},
            overwrite=overwrite,
            on_param=on_param,
        )


def read_scores(path) -> dict[str, np.ndarray]:
    """importance.npz of a structured-pruned model directory (no pickles are loaded)."""
    file = paths.absolute(path) / SCORES_FILE
    if not file.exists():
        raise CheckpointError(f"{file} does not exist; was {path} made by structured pruning?")
    with np.load(os.fspath(file), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _tokenizer_files(model: ModelDir, tokenizer: str | None) -> dict[str, str]:
    source = tokenizer or model.tokenizer_path
    if source is None:
        raise CheckpointError(f"{model} has no tokenizer to ship; pass one with --tokenizer")
    source = paths.absolute(source)
    if source.is_dir():
        return tokenizer_files(source)
    if not source.exists():
        raise CheckpointError(f"tokenizer {source} does not exist")
    name = TOKENIZER_FILES[1 if source.suffix == ".model" else 0]
    return {name: os.fspath(source)}


def structured_prune_dir(
    path,
    out_dir,
    spec: StructuredConfig,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    tokenizer: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    dtype=jnp.float32,
    progress: Callable[[int, int], None] | None = None,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> Pruned:
    """Structured pruning of any float model directory (a path or a ModelDir) into a
    converted one at `out_dir`.

    Everything a user can get wrong (targets, source kind, output directory, tokenizer,
    calibration data and its size) is checked before the weights are read, and nothing
    is written until the pruned model is complete. dry_run: score and choose, write
    nothing (out_dir may be None). A magnitude-pruned source is accepted: its zeros stay
    in the kept slices, and its record moves to `structured.source_sparsity` (the
    per-layer fractions no longer describe the sliced matrices).
    """
    if not dry_run:
        inputs = [path, tokenizer, spec.calibration_data]
        out_dir = check_out_dir(out_dir, overwrite, inputs=inputs)
    source = ModelDir.open(path)
    config = source.config
    source_sparsity = check_source(source)
    target_config(config, spec)
    if spec.calibration_seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"calibration_seq_len={spec.calibration_seq_len} is more than the model's "
            f"context (max_position_embeddings={config.max_position_embeddings})"
        )
    _, fmt, _ = calibration_source(spec)
    files = {} if dry_run else _tokenizer_files(source, tokenizer)
    tok = None
    # A tokens file needs no tokenizer (a 1-D stream takes its EOS id when there is one).
    if fmt != "tokens" or tokenizer or source.tokenizer_path:
        tok = load_tokenizer(tokenizer or source)
    batches = calibration_batches(spec, tok, mesh, rules, vocab_size=config.vocab_size)
    stored = source.stored_dtypes["embed.embedding"]
    _, abstract = source.abstract(mesh, rules, dtype=stored)
    params = source.load_params(abstract)
    if source_sparsity is not None:
        logging.warning("%s is magnitude-pruned; its zeros stay in the kept slices", source)
    pruned = prune_params(
        config,
        params,
        spec,
        batches,
        mesh=mesh,
        rules=rules,
        dtype=dtype,
        dry_run=dry_run,
        progress=progress,
    )
    del params
    if dry_run:
        return pruned
    save_pruned(
        out_dir,
        pruned,
        metadata={
            "source": {"kind": source.kind, "path": os.fspath(source.path.resolve())},
            "dtype": str(stored),
            "source_sparsity": source_sparsity,
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )
    return pruned


def load_or_prune(
    save_dir,
    spec: StructuredConfig,
    teacher_config: LlamaConfig,
    teacher_params: Mapping[str, Any],
    abstract: Mapping[str, Any],
    *,
    tokenizer,
    mesh,
    rules=sharding.DEFAULT_RULES,
    run_data: data.DataConfig | None = None,
    dtype=jnp.float32,
    teacher_source: str = "",
    files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The pruned initial student of a prune-then-distil run, in the dtypes and
    shardings of `abstract` (the student's abstract parameters).

    The first call prunes `teacher_params` (on the calibration data, the run's own by
    default) and saves the result as a model directory at `save_dir` (with its scores,
    and `files`, e.g. the tokenizer's, copied in); a later call, e.g. after a
    preemption before the first checkpoint, reads it back instead of pruning again.
    Every process must call this.
    """
    student = target_config(teacher_config, spec)
    save_dir = paths.absolute(save_dir)
    if not save_dir.exists():
        # Named in full, so the saved record says what the scores were measured on.
        path, fmt, field = calibration_source(spec, run_data)
        spec = dataclasses.replace(
            spec, calibration_data=path, calibration_format=fmt, calibration_field=field
        )
        batches = calibration_batches(
            spec, tokenizer, mesh, rules, vocab_size=teacher_config.vocab_size, run_data=run_data
        )
        pruned = prune_params(
            teacher_config, teacher_params, spec, batches, mesh=mesh, rules=rules, dtype=dtype
        )
        source = {"kind": "teacher", "path": teacher_source}
        dtype_saved = str(jax.tree.leaves(pruned.params)[0].dtype)
        save_pruned(
            save_dir, pruned, metadata={"source": source, "dtype": dtype_saved}, files=files
        )
        del pruned
    saved = ModelDir.open(save_dir)
    if saved.config != student:
        raise ConfigError(
            f"{save_dir} holds a pruned student of another shape than structured asks "
            f"for ({saved.config} vs {student}); use a new workdir"
        )
    return saved.load_params(abstract)
