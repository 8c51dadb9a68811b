"""Model directories: reading any kind of model.

Three kinds of directory hold a model, and every reader here accepts each of them:

- `hf`: a transformers `save_pretrained` directory (config.json, safetensors).
- `converted`: this project's layout, written by `dir_writer.write_model_dir`:
  `config.json` (a LlamaConfig), `params/` (an Orbax checkpoint whose `state/` item is
  the parameter tree), tokenizer files, `generation_config.json` and `metadata.json`
  (source, dtype, quantization, sparsity).
- `run`: a training or distillation workdir (`checkpoints/<step>/`), or one step
  directory in it; the latest intact step is read (`checkpoint.latest_intact_step`),
  parameters only. A LoRA run's checkpoints hold adapters only: readers load the base
  its metadata records, check its fingerprint, and merge the adapters onto it
  (`load_lora_run`, with the LoRA logic in `lora_dir`).

Parameters are read straight into the shardings asked for, whatever mesh wrote them.
Writing is `dir_writer`'s; directory-to-directory transforms are `transforms`'.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llama_jax import compress, errors, paths, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import Tokenizer
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats import fingerprint, lora_dir, runs
from llama_jax.formats.hf.layout import HFReader, hf_tensor_names, read_hf_config
from llama_jax.nn import Llama
from llama_jax.tree import flatten, nest

PARAMS = "params"
# Orbax's partial-save layout keeps the tree in this item of the checkpoint directory.
PARAMS_ITEM = "state"
METADATA = "metadata.json"
# Files copied next to the weights, when the source has them. A model directory needs
# tokenizer.json or tokenizer.model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
GENERATION_CONFIG = "generation_config.json"
KINDS = ("hf", "converted", "run")


def detect(path) -> str:
    """The kind of model directory at `path`: 'hf', 'converted' or 'run'."""
    path = paths.absolute(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if (path / METADATA).exists() and (path / PARAMS).is_dir():
        return "converted"
    if (path / "checkpoints").is_dir() or (path / runs.STATE).is_dir():
        return "run"
    if (path / "config.json").exists():
        return "hf"
    raise CheckpointError(
        f"{path} is not a model directory: expected config.json with safetensors (Hugging "
        f"Face), {METADATA} with {PARAMS}/ (converted), or checkpoints/ (a training run)"
    )


def run_step_dir(path) -> epath.Path:
    """The latest intact step directory of a run (or `path` itself if it is one)."""
    path = paths.absolute(path)
    if (path / runs.STATE).is_dir():
        return path
    step = runs.latest_intact_step(path / "checkpoints")
    return path / "checkpoints" / str(step)


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: expected a JSON object ({e})") from e


def run_meta(path) -> dict[str, Any]:
    """The `meta` item (a JSON dict) of a run's latest intact step."""
    step_dir = run_step_dir(path)
    meta_dir = step_dir / runs.META
    files = [p for p in meta_dir.iterdir()] if meta_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{step_dir} has no {runs.META}/ item")
    return _read_json(files[0])


def read_config(path) -> LlamaConfig:
    """The architecture of the model in any kind of model directory."""
    path = paths.absolute(path)
    kind = detect(path)
    try:
        if kind == "run":
            meta = run_meta(path)
            if "model" not in meta:
                raise CheckpointError(
                    f"{run_step_dir(path)}: the checkpoint metadata has no model config"
                )
            return LlamaConfig.from_dict(meta["model"])
        config_path = path / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{path} has no config.json")
        return LlamaConfig.from_json_file(config_path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def find_tokenizer(path) -> str | None:
    """A directory or file holding the model's tokenizer, or None. A run names the
    tokenizer it trained with in its config."""
    path = paths.absolute(path)
    if detect(path) == "run":
        meta = run_meta(path)
        found = meta.get("config", {}).get("data", {}).get("tokenizer") or None
        if found and epath.Path(found).exists():
            return found
        # A LoRA run trained on pre-tokenized data still has its base's tokenizer.
        base = meta.get("lora", {}).get("base", {}).get("path")
        return find_tokenizer(base) if base and epath.Path(base).exists() else None
    if any((path / name).exists() for name in TOKENIZER_FILES[:2]):
        return str(path)
    return None


def load_tokenizer(path):
    """The Tokenizer of a model directory (any kind), or of a tokenizer file or
    directory; raises CheckpointError if there is none."""
    path = paths.absolute(path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    has_own = path.is_dir() and any((path / n).exists() for n in TOKENIZER_FILES[:2])
    found = str(path) if has_own else find_tokenizer(path)
    if found is None:
        raise CheckpointError(
            f"{path} has no tokenizer (looked for {TOKENIZER_FILES[0]} and "
            f"{TOKENIZER_FILES[1]}, or a run's data.tokenizer)"
        )
    if epath.Path(found).is_dir():
        return Tokenizer.from_dir(found)
    return Tokenizer.from_file(found)


def abstract_params(
    config: LlamaConfig,
    mesh,
    rules=sharding.DEFAULT_RULES,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    quantization: str | None = None,
    quantize_head: bool = False,
    quantize_embed: bool = False,
    **model_kwargs,
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The model's graphdef and its parameters as a nested dict of ShapeDtypeStructs
    carrying their target shardings on `mesh`. quantization: None or 'int8' (the block
    projections int8 with scales, and the LM head / embedding when asked; quant.py)."""
    param_dtype = jnp.dtype(param_dtype or dtype)
    model_kwargs = dict(
        model_kwargs, **compress.model_kwargs(quantization, quantize_head, quantize_embed)
    )
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: Llama(
                config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **model_kwargs
            )
        )
    )
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
    abstract = jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
        nnx.to_pure_dict(state),
        shardings,
    )
    return graphdef, abstract


def _orbax_tree(item_dir: epath.Path) -> Any:
    try:
        return ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    except Exception as e:
        raise CheckpointError(
            f"{item_dir}: cannot read the Orbax checkpoint ({errors.first_line(e)})"
        ) from e


def _check_shapes(saved: Mapping[str, Any], wanted: Mapping[str, Any], where) -> None:
    saved_flat, wanted_flat = flatten(saved), flatten(wanted)
    problems = [f"missing {k}" for k in sorted(wanted_flat.keys() - saved_flat.keys())]
    problems += [
        f"{k} has shape {tuple(saved_flat[k].shape)}, expected {tuple(wanted_flat[k].shape)}"
        for k in sorted(wanted_flat.keys() & saved_flat.keys())
        if tuple(saved_flat[k].shape) != tuple(wanted_flat[k].shape)
    ]
    if problems:
        raise CheckpointError(
            f"{where} does not hold the parameters of this config: {'; '.join(problems[:8])}"
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def _params_source(path: epath.Path) -> tuple[epath.Path, str | None]:
    """The Orbax item directory holding the parameters, and the key they sit under."""
    kind = detect(path)
    if kind == "converted":
        return path / PARAMS / PARAMS_ITEM, None
    if kind == "run":
        return run_step_dir(path) / runs.STATE, "params"
    raise ValueError(kind)


def _restore(item_dir: epath.Path, key: str | None, abstract: Mapping[str, Any]) -> Any:
    saved = _orbax_tree(item_dir)
    if key is not None:
        if key not in saved:
            raise CheckpointError(f"{item_dir} has no {key!r} in its tree")
        saved = saved[key]
    _check_shapes(saved, abstract, item_dir)
    target = abstract if key is None else {key: abstract}
    try:
        restored = ocp.PyTreeCheckpointHandler().restore(
            item_dir,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=key is not None or flatten(saved).keys() != flatten(abstract),
            ),
        )
    except Exception as e:
        raise CheckpointError(
            f"{item_dir}: restoring the parameters failed ({errors.first_line(e)})"
        ) from e
    return restored if key is None else restored[key]


def load_params(path, config: LlamaConfig, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of the model directory `path`, read into the shardings and dtypes
    of `abstract` (a nested dict of ShapeDtypeStructs, see `abstract_params`).

    A Hugging Face directory is read slice by slice (each host reads only its devices'
    slices); Orbax checkpoints are restored directly into the target shardings."""
    path = paths.absolute(path)
    kind = detect(path)
    saved_config = read_config(path)
    if saved_config != config:
        was, now = saved_config.to_dict(), config.to_dict()
        diff = ", ".join(f"{k}: {was[k]!r} vs {now[k]!r}" for k in was if was[k] != now[k])
        raise CheckpointError(f"{path} holds a different architecture: {diff}")
    if lora_info(path) is not None:
        return load_lora_run(path, config, abstract)
    if kind != "hf":
        return _restore(*_params_source(path), abstract)
    flat = flatten(abstract)
    if any(k.endswith(compress.SCALE_SUFFIX) for k in flat):
        raise CheckpointError(
            f"{path} is a float Hugging Face directory; convert it with "
            "convert.hf_to_orbax --quantize=int8 to load it quantized"
        )
    reader = HFReader(str(path), config)
    reader.check(flat)
    out = {}
    for name, array in sharding.sharded_arrays(abstract, reader.read):
        out[name] = array
        reader.release()
    return nest(out)


def load_model(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    **model_kwargs,
) -> tuple[Llama, LlamaConfig]:
    """A `Llama` from any kind of model directory, and its config.

    dtype: compute dtype; param_dtype: stored dtype (default: dtype). mesh: where to
    place the parameters (default: the first device). Other keyword arguments go to
    `Llama` (scan_layers, remat_policy, attention_impl). A quantized directory gives
    the quantized model (its float parameters in param_dtype)."""
    config = read_config(path)
    if mesh is None:
        mesh = sharding.create_mesh(devices=jax.devices()[:1])
    graphdef, abstract = abstract_params(
        config,
        mesh,
        rules,
        dtype=dtype,
        param_dtype=param_dtype,
        **quant_kwargs(path),
        **model_kwargs,
    )
    params = load_params(path, config, abstract)
    state = nnx.split(nnx.eval_shape(lambda: nnx.merge(graphdef, abstract)))[1]
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), config


def load_hf(
    hf_dir,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    **model_kwargs,
) -> tuple[Llama, LlamaConfig]:
    """`load_model` for a transformers `save_pretrained` LLaMA directory (tensors are
    checked before any is read; each device's slice is read from disk on its own)."""
    read_hf_config(str(hf_dir))
    return load_model(
        hf_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs
    )


def iter_host_params(path, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (dotted path, numpy array in its stored dtype) one parameter at a time, in
    the model's parameter order, so only one parameter is ever in host memory (a LoRA
    run's merged onto its base, see `load_lora_run`)."""
    path = paths.absolute(path)
    kind = detect(path)
    if lora_info(path) is not None:
        yield from _iter_lora_run(path, config)
        return
    _, abstract = abstract_params(
        config, sharding.create_mesh(devices=jax.devices()[:1]), **quant_kwargs(path)
    )
    names = list(flatten(abstract))
    if kind == "hf":
        reader = HFReader(str(path), config)
        reader.check(names)
        for name in names:
            tensor_name = hf_tensor_names(name, config)[0]
            yield name, reader.read(name, None, reader.tensors[tensor_name].dtype(tensor_name))
            reader.release()
        return
    item_dir, key = _params_source(path)
    saved = _orbax_tree(item_dir)
    saved = saved[key] if key is not None else saved
    _check_shapes(saved, abstract, item_dir)
    saved_flat = flatten(saved)
    for name in names:
        meta = saved_flat[name]
        target = nest({name: np.zeros((), dtype=np.dtype(meta.dtype))})
        if key is not None:
            target = {key: target}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = ocp.PyTreeCheckpointHandler().restore(
                item_dir,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"{item_dir}: reading {name} failed ({errors.first_line(e)})"
            ) from e
        if key is not None:
            restored = restored[key]
        yield name, np.asarray(flatten(restored)[name])


def read_metadata(path) -> dict[str, Any]:
    """metadata.json of a converted directory ({} for other kinds)."""
    path = paths.absolute(path)
    return _read_json(path / METADATA) if detect(path) == "converted" else {}


def quantization(path) -> str | None:
    """The quantization mode of a model directory (None: float)."""
    return read_metadata(path).get("quantization")


def quant_kwargs(path) -> dict[str, Any]:
    """`abstract_params` keyword arguments for the model stored in `path`."""
    meta = read_metadata(path)
    return dict(
        quantization=meta.get("quantization"),
        quantize_head=bool(meta.get("quantized_head")),
        quantize_embed=bool(meta.get("quantized_embed")),
    )


def lora_info(path) -> dict[str, Any] | None:
    """The `lora` entry of a run's checkpoint metadata (the LoRA settings, and the
    base's path and fingerprint), or None for any other model directory."""
    path = paths.absolute(path)
    if detect(path) != "run":
        return None
    return run_meta(path).get("lora")


def stored_float_dtype(path) -> np.dtype:
    """The dtype a model directory stores its float parameters in (a norm scale's: never
    quantized)."""
    path = paths.absolute(path)
    return stored_dtypes(path, read_config(path))["final_norm.scale"]


def stored_dtypes(path: epath.Path, config: LlamaConfig) -> dict[str, np.dtype]:
    """Each parameter's dtype as stored, in the model's parameter order (a LoRA run's:
    its base's, with int8 kernels merged into the base's float dtype)."""
    info = lora_info(path)
    if info is not None:
        base = stored_dtypes(epath.Path(info["base"]["path"]), config)
        float_dtype = base["final_norm.scale"]
        return {n: float_dtype if dt == np.int8 else dt for n, dt in base.items()}
    _, abstract = abstract_params(config, sharding.create_mesh(devices=jax.devices()[:1]))
    names = list(flatten(abstract))
    if detect(path) == "hf":
        reader = HFReader(str(path), config)
        reader.check(names)
        return {
            n: reader.tensors[t].dtype(t) for n in names for t in [hf_tensor_names(n, config)[0]]
        }
    item_dir, key = _params_source(path)
    saved = _orbax_tree(item_dir)
    saved = flatten(saved[key] if key is not None else saved)
    _check_shapes(nest(saved), abstract, item_dir)
    return {n: np.dtype(saved[n].dtype) for n in names}


def load_lora_run(
    path, config: LlamaConfig, abstract: Mapping[str, Any], *, base_dir=None
) -> dict[str, Any]:
    """The parameters of a LoRA run merged onto its base (`lora.merge`), in the
    shardings and dtypes of `abstract` (the plain float model's, see `abstract_params`).

    The base (the one the run recorded, or `base_dir` if it moved) is read as stored,
    float or int8, and must match the recorded fingerprint; the adapters are the latest
    intact step's."""
    path = paths.absolute(path)
    info = lora_info(path)
    base_dir = lora_dir.locate_base(path, info, base_dir)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    _, abstract_base = abstract_params(
        config, mesh, dtype=stored_float_dtype(base_dir), **quant_kwargs(base_dir)
    )
    base = load_params(base_dir, config, abstract_base)
    lora_dir.check_lora_base(info, fingerprint.fingerprint(config, base), base_dir)
    item_dir = run_step_dir(path) / runs.STATE
    adapters = _restore(item_dir, "params", lora_dir.adapters_abstract(config, info, mesh))
    return lora_dir.merge_onto_base(base, adapters, info, abstract)


def _iter_lora_run(path: epath.Path, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_host_params` of a LoRA run (see `lora_dir.merged_host_params`)."""
    info = lora_info(path)
    base_dir = lora_dir.locate_base(path, info, None)
    lora_dir.check_base_config(info, read_config(base_dir), base_dir)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    item_dir = run_step_dir(path) / runs.STATE
    adapters = flatten(
        jax.device_get(_restore(item_dir, "params", lora_dir.adapters_abstract(config, info, mesh)))
    )
    _, base_abstract = abstract_params(config, mesh, **quant_kwargs(base_dir))
    _, float_abstract = abstract_params(config, mesh)
    yield from lora_dir.merged_host_params(
        info,
        base_dir,
        adapters,
        iter_host_params(base_dir, config),
        base_names=set(flatten(base_abstract)),
        names=list(flatten(float_abstract)),
    )


def tokenizer_files(directory) -> dict[str, str]:
    """The tokenizer and generation files present in `directory`, name -> path."""
    directory = epath.Path(directory)
    return {
        name: str(directory / name)
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG)
        if (directory / name).exists()
    }
