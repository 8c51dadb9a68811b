"""Model directories: writing the converted layout, and reading any kind of model.

Three kinds of directory hold a model, and every reader here accepts each of them:

- `hf`: a transformers `save_pretrained` directory (config.json, safetensors).
- `converted`: this project's layout, written by `write_model_dir`:
  `config.json` (a LlamaConfig), `params/` (an Orbax checkpoint whose `state/` item is
  the parameter tree), tokenizer files, `generation_config.json` and `metadata.json`
  (source, dtype, quantization, sparsity).
- `run`: a training or distillation workdir (`checkpoints/<step>/`), or one step
  directory in it; the latest complete step is read, parameters only. A LoRA run's
  checkpoints hold adapters only: readers load the base its metadata records, check
  its fingerprint, and merge the adapters onto it (`load_lora_run`).

Parameters are read straight into the shardings the caller asks for, whatever mesh
wrote them.
"""

from __future__ import annotations

import ctypes
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental import v1 as ocp_v1

from llama_jax import checkpoint, hf_keymap, lora, prune, quant, sharding
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.hf import (
    HFReader,
    hf_shape,
    hf_tensor_names,
    layout_dims,
    project_to_hf,
    read_hf_config,
)
from llama_jax.model import Llama
from llama_jax.safetensors_file import CheckpointError, write_safetensors

FORMAT = "llama_jax.model"
FORMAT_VERSION = 1
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
    path = epath.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if (path / METADATA).exists() and (path / PARAMS).is_dir():
        return "converted"
    if (path / "checkpoints").is_dir() or (path / checkpoint.STATE).is_dir():
        return "run"
    if (path / "config.json").exists():
        return "hf"
    raise CheckpointError(
        f"{path} is not a model directory: expected config.json with safetensors (Hugging "
        f"Face), {METADATA} with {PARAMS}/ (converted), or checkpoints/ (a training run)"
    )


def _run_step_dir(path: epath.Path) -> epath.Path:
    """The latest complete step directory of a run (or `path` itself if it is one)."""
    if (path / checkpoint.STATE).is_dir():
        return path
    steps = [
        int(p.name)
        for p in (path / "checkpoints").iterdir()
        if p.name.isdigit() and (p / checkpoint.COMMIT_MARKER).exists()
    ]
    if not steps:
        raise CheckpointError(f"{path}/checkpoints holds no complete checkpoint")
    return path / "checkpoints" / str(max(steps))


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: expected a JSON object ({e})") from e


def _run_meta(path: epath.Path) -> dict[str, Any]:
    step_dir = _run_step_dir(path)
    meta_dir = step_dir / checkpoint.META
    files = [p for p in meta_dir.iterdir()] if meta_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{step_dir} has no {checkpoint.META}/ item")
    return _read_json(files[0])


def read_config(path) -> LlamaConfig:
    """The architecture of the model in any kind of model directory."""
    path = epath.Path(path)
    kind = detect(path)
    try:
        if kind == "run":
            meta = _run_meta(path)
            if "model" not in meta:
                raise CheckpointError(
                    f"{_run_step_dir(path)}: the checkpoint metadata has no model config"
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
    path = epath.Path(path)
    if detect(path) == "run":
        meta = _run_meta(path)
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
    from llama_jax.tokenizer import Tokenizer

    path = epath.Path(path)
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
        model_kwargs, **quant.model_kwargs(quantization, quantize_head, quantize_embed)
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


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _flatten(v, key + ".") if isinstance(v, Mapping) else {key: v}
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep=".")


def _orbax_tree(item_dir: epath.Path) -> Any:
    try:
        return ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    except Exception as e:
        raise CheckpointError(
            f"{item_dir}: cannot read the Orbax checkpoint ({checkpoint._first_line(e)})"
        ) from e


def _check_shapes(saved: Mapping[str, Any], wanted: Mapping[str, Any], where) -> None:
    saved_flat, wanted_flat = _flatten(saved), _flatten(wanted)
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
        return _run_step_dir(path) / checkpoint.STATE, "params"
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
                partial_restore=key is not None or _flatten(saved).keys() != _flatten(abstract),
            ),
        )
    except Exception as e:
        raise CheckpointError(
            f"{item_dir}: restoring the parameters failed ({checkpoint._first_line(e)})"
        ) from e
    return restored if key is None else restored[key]


def load_params(path, config: LlamaConfig, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of the model directory `path`, read into the shardings and dtypes
    of `abstract` (a nested dict of ShapeDtypeStructs, see `abstract_params`).

    A Hugging Face directory is read slice by slice (each host reads only its devices'
    slices); Orbax checkpoints are restored directly into the target shardings."""
    path = epath.Path(path)
    kind = detect(path)
    saved_config = read_config(path)
    if saved_config != config:
        raise CheckpointError(
            f"{path} holds a different architecture: {_config_diff(saved_config, config)}"
        )
    if lora_info(path) is not None:
        return load_lora_run(path, config, abstract)
    if kind != "hf":
        return _restore(*_params_source(path), abstract)
    flat = _flatten(abstract)
    if any(k.endswith(quant.SCALE_SUFFIX) for k in flat):
        raise CheckpointError(
            f"{path} is a float Hugging Face directory; convert it with "
            "convert.hf_to_orbax --quantize=int8 to load it quantized"
        )
    reader = HFReader(str(path), config)
    reader.check(flat)
    out = {}
    for name, array in sharded_arrays(abstract, reader.read):
        out[name] = array
        reader.release()
    return _nest(out)


def _config_diff(a: LlamaConfig, b: LlamaConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


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
    """`load_model` for a transformers `save_pretrained` LLaMA directory: every tensor
    is checked for presence, dtype and shape before any is read, and unknown tensors
    are an error. With a mesh, each device's slice is read from disk on its own."""
    read_hf_config(str(hf_dir))
    return load_model(
        hf_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs
    )


def iter_host_params(path, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (dotted path, numpy array in its stored dtype) one parameter at a time, in
    the model's parameter order, so only one parameter is ever in host memory (a LoRA
    run's merged onto its base, see `load_lora_run`)."""
    path = epath.Path(path)
    kind = detect(path)
    if lora_info(path) is not None:
        yield from _iter_lora_run(path, config)
        return
    _, abstract = abstract_params(
        config, sharding.create_mesh(devices=jax.devices()[:1]), **quant_kwargs(path)
    )
    names = list(_flatten(abstract))
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
    saved_flat = _flatten(saved)
    for name in names:
        meta = saved_flat[name]
        target = _nest({name: np.zeros((), dtype=np.dtype(meta.dtype))})
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
                f"{item_dir}: reading {name} failed ({checkpoint._first_line(e)})"
            ) from e
        if key is not None:
            restored = restored[key]
        yield name, np.asarray(_flatten(restored)[name])


def read_metadata(path) -> dict[str, Any]:
    """metadata.json of a converted directory ({} for other kinds)."""
    path = epath.Path(path)
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


# --- LoRA runs ---------------------------------------------------------------


def lora_info(path) -> dict[str, Any] | None:
    """The `lora` entry of a run's checkpoint metadata (the LoRA settings, and the
    base's path and fingerprint), or None for any other model directory."""
    path = epath.Path(path)
    if detect(path) != "run":
        return None
    return _run_meta(path).get("lora")


def stored_float_dtype(path) -> np.dtype:
    """The dtype a model directory stores its float parameters in (a norm scale's: never
    quantized)."""
    path = epath.Path(path)
    return _stored_dtypes(path, read_config(path))["final_norm.scale"]


def _other_base(info: Mapping[str, Any], base_dir, why: str):
    return CheckpointError(
        f"the base at {base_dir} has {why} than the one these LoRA adapters were trained "
        f"on ({info['base']['path']}); use that base, or a new workdir for new adapters"
    )


def check_lora_base(info: Mapping[str, Any], fingerprint: Mapping[str, Any], base_dir) -> None:
    """Raises unless `fingerprint` (`checkpoint.fingerprint` of the model in base_dir)
    is that of the base the adapters of `info` (`lora_info`) were trained on."""
    why = checkpoint.fingerprint_mismatch(info["base"]["fingerprint"], fingerprint)
    if why is not None:
        raise _other_base(info, base_dir, why)


def _lora_base_dir(path: epath.Path, info: Mapping[str, Any], base_dir) -> epath.Path:
    base_dir = epath.Path(base_dir or info["base"]["path"])
    if not base_dir.exists():
        raise CheckpointError(
            f"{path} holds LoRA adapters for the base {base_dir}, which does not exist; "
            "give its new location (launch.merge_lora --base_dir)"
        )
    return base_dir


def _adapters_abstract(config: LlamaConfig, info: Mapping[str, Any], mesh) -> dict[str, Any]:
    lora_cfg = lora.from_meta(info)
    return lora.abstract_model(lambda: Llama(config, lora=lora_cfg, rngs=nnx.Rngs(0)), mesh)[1]


def load_lora_run(
    path, config: LlamaConfig, abstract: Mapping[str, Any], *, base_dir=None
) -> dict[str, Any]:
    """The parameters of a LoRA run merged onto its base (`lora.merge`), in the
    shardings and dtypes of `abstract` (the plain float model's, see `abstract_params`).

    The base (the one the run recorded, or `base_dir` if it moved) is read as stored,
    float or int8, and must match the recorded fingerprint; the adapters are the latest
    complete step's."""
    path = epath.Path(path)
    info = lora_info(path)
    base_dir = _lora_base_dir(path, info, base_dir)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    _, abstract_base = abstract_params(
        config, mesh, dtype=stored_float_dtype(base_dir), **quant_kwargs(base_dir)
    )
    base = load_params(base_dir, config, abstract_base)
    check_lora_base(info, checkpoint.fingerprint(config, base), base_dir)
    item_dir = _run_step_dir(path) / checkpoint.STATE
    adapters = _restore(item_dir, "params", _adapters_abstract(config, info, mesh))
    lora_cfg = lora.from_meta(info)
    dtypes = jax.tree.map(lambda x: x.dtype, abstract)

    def merge(base, adapters):
        merged = lora.merge(base, adapters, lora_cfg)
        return jax.tree.map(lambda x, dt: x.astype(dt), merged, dtypes)

    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(merge, out_shardings=shardings)(base, adapters)


def _iter_lora_run(path: epath.Path, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_host_params` of a LoRA run: the base streamed one parameter at a time, each
    checked against the recorded fingerprint, target kernels merged layer by layer and
    int8 ones dequantized (float32)."""
    info = lora_info(path)
    base_dir = _lora_base_dir(path, info, None)
    saved = info["base"]["fingerprint"]
    if saved["config_sha256"] != checkpoint.config_digest(read_config(base_dir)):
        raise _other_base(info, base_dir, "another architecture")
    lora_cfg = lora.from_meta(info)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    item_dir = _run_step_dir(path) / checkpoint.STATE
    adapters = _flatten(
        jax.device_get(_restore(item_dir, "params", _adapters_abstract(config, info, mesh)))
    )
    _, base_abstract = abstract_params(config, mesh, **quant_kwargs(base_dir))
    base_names = set(_flatten(base_abstract))
    stream = iter_host_params(base_dir, config)
    held: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        while name not in held:
            got, x = next(stream)
            stats = saved["params"].get(checkpoint.fingerprint_key(got))
            if stats is None or not checkpoint.same_stats(stats, checkpoint.host_stats(x)):
                raise _other_base(info, base_dir, f"other weights ({got} differs)")
            held[got] = x
        return held.pop(name)

    _, float_abstract = abstract_params(config, mesh)
    for name in _flatten(float_abstract):
        x = take(name)
        scale_name = name + quant.SCALE_SUFFIX
        scale = take(scale_name) if scale_name in base_names else None
        module, _, leaf = name.rpartition(".")
        if leaf == "kernel" and module in lora_cfg.targets:
            a, b = adapters[f"{module}.lora_a"], adapters[f"{module}.lora_b"]
            x = _merge_layers(x, scale, a, b, lora_cfg.scale)
        elif scale is not None:
            x = np.asarray(_flatten(quant.dequantize_params({name: x, scale_name: scale}))[name])
        yield name, x


def _merge_layers(kernel, scale, a, b, lora_scale: float) -> np.ndarray:
    """A stacked kernel [L, in..., out...] (float, or int8 with scale [L, out...]) with
    adapters merged, one layer at a time so only one layer's float32 copy exists."""
    num_in = a.ndim - 2
    out = np.empty(kernel.shape, np.float32 if scale is not None else kernel.dtype)
    for i in range(kernel.shape[0]):
        w = kernel[i]
        if scale is not None:
            w = quant.dequantize(w, scale[i], num_in, stacked=False)
        out[i] = np.asarray(lora.merge_kernel(w, a[i], b[i], lora_scale))
    return out


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
    out_dir = check_out_dir(out_dir, overwrite)
    path = epath.Path(path)
    info = lora_info(path)
    if info is None:
        raise CheckpointError(
            f"{path} is not a LoRA run: its checkpoint metadata has no 'lora' entry"
        )
    base_dir = _lora_base_dir(path, info, base_dir)
    config = read_config(path)
    if dtype == "auto":
        dtype = str(stored_float_dtype(base_dir))
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    files = _export_tokenizer_files(
        path, tokenizer or find_tokenizer(path) or find_tokenizer(base_dir)
    )
    _, abstract = abstract_params(config, mesh, rules, dtype=jnp.dtype(dtype))
    return write_model_dir(
        out_dir,
        config,
        handed_out(load_lora_run(path, config, abstract, base_dir=base_dir)),
        metadata={
            "source": {"kind": "lora", "path": str(path.resolve()), "base": str(base_dir)},
            "dtype": dtype,
            "lora": {k: v for k, v in info.items() if k != "base"},
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )


# --- writing -----------------------------------------------------------------


def check_out_dir(out_dir, overwrite: bool) -> epath.Path:
    """Refuses an existing output directory unless `overwrite`; returns it as a Path."""
    out_dir = epath.Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(
            f"{out_dir} already exists; pass --overwrite to replace it (it is replaced only "
            "once the new one is complete)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
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
    _sync("llama_jax.model_dir.tmp")
    return tmp


def handed_out(params: Mapping[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    """(dotted path, array) pairs of a nested parameter dict for `write_model_dir`,
    each dropped from the dict as it is handed out: once the caller holds no other
    reference, a written parameter's memory is freed before the next is saved."""
    flat = _flatten(params)
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
        tree = _nest({name: array})
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
    _sync("llama_jax.model_dir.params")
    if jax.process_index() == 0:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for dest, src in files.items():
            shutil.copyfile(src, tmp / dest)
        if GENERATION_CONFIG not in files:
            gen = dict(generation_config or _generation_config(config))
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
    _sync("llama_jax.model_dir.files")
    replace_dir(tmp, out_dir)
    _sync("llama_jax.model_dir.done")
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


def _generation_config(config: LlamaConfig) -> dict[str, Any]:
    eos = list(config.eos_token_ids)
    gen: dict[str, Any] = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return gen


def tokenizer_files(directory) -> dict[str, str]:
    """The tokenizer and generation files present in `directory`, name -> path."""
    directory = epath.Path(directory)
    return {
        name: str(directory / name)
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG)
        if (directory / name).exists()
    }


def build_sharded(shape, sharding_, read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array in `sharding_` from `read(index)`, which returns one device's
    slice as a new numpy array; each process reads only its own devices' slices.

    Like `jax.make_array_from_callback`, but each slice is handed to its device without
    a second host copy where the device is the host (CPU): a converting host then
    holds each parameter once, not twice.
    """
    shards = []
    for device, index in sharding_.addressable_devices_indices_map(shape).items():
        host = read(index)
        shards.append(jax.device_put(host, device, donate=device.platform == "cpu"))
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding_, shards)


def sharded_arrays(
    abstract: Mapping[str, Any], read: Callable[[str, tuple[slice, ...], Any], np.ndarray]
) -> Iterator[tuple[str, jax.Array]]:
    """Lazily builds each parameter of `abstract` in its sharding from
    `read(path, index, dtype)`, which returns one device's slice."""
    for name, leaf in _flatten(abstract).items():
        yield (
            name,
            build_sharded(
                leaf.shape, leaf.sharding, lambda idx, n=name, dt=leaf.dtype: read(n, idx, dt)
            ),
        )


def params_nbytes(abstract: Mapping[str, Any]) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


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
    out_dir = check_out_dir(out_dir, overwrite)
    hf_dir = epath.Path(hf_dir)
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
    qopts = _quant_options(reader.config, quantize, quantize_head, quantize_embed)
    _, abstract = abstract_params(reader.config, mesh, rules, dtype=jnp.dtype(dtype), **qopts)
    targets = set(quant.quantized_paths(head=quantize_head, embed=quantize_embed))
    names = [n for n in _flatten(abstract) if not n.endswith(quant.SCALE_SUFFIX)]
    reader.check(names)
    if progress is not None:
        progress.start(len(names), sum(reader.nbytes(n) for n in names))
    scales: dict[str, np.ndarray] = {}

    def scale_of(kernel: str) -> np.ndarray:
        if kernel not in scales:
            absmax = reader.row_absmax(kernel)
            scales[kernel] = np.where(absmax > 0, absmax * quant.INV_127, np.float32(1))
        return scales[kernel]

    def read(name, index, dt):
        if name.endswith(quant.SCALE_SUFFIX):
            return np.ascontiguousarray(scale_of(name[: -len(quant.SCALE_SUFFIX)])[index])
        if quantize is None or name not in targets:
            return reader.read(name, index, dt)
        axes = quant.reduce_axes(name)
        w = reader.read(name, index, np.float32)
        s = scale_of(name)[tuple(ix for a, ix in enumerate(index) if a not in axes)]
        s = np.expand_dims(s, axes)
        return np.clip(np.rint(w / s), -127, 127).astype(np.int8)

    def arrays():
        for name, array in sharded_arrays(abstract, read):
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
    """Writes the model in any kind of model directory as a Hugging Face directory:
    sharded safetensors with an index, a transformers config.json, generation_config.json
    and the tokenizer files.

    Streams one parameter at a time (restored on the host, split into its per-layer
    tensors, written). dtype: 'auto' keeps each tensor's stored dtype, or one of DTYPES.
    tokenizer: a directory or tokenizer file to ship (default: the model's own). Runs
    on one process; written under a temporary name and renamed when complete.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    path = epath.Path(path)
    config = read_config(path)
    if quantization(path) is not None:
        raise CheckpointError(
            f"{path} is quantized ({quantization(path)}); export the float model it was "
            "made from (transformers has no matching int8 LLaMA layout)"
        )
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; expected 'auto' or one of {DTYPES}")
    files = _export_tokenizer_files(path, tokenizer)
    stored = _stored_dtypes(path, config)
    dims = layout_dims(config)
    entries = []
    for name in stored:
        out_dtype = np.dtype(stored[name] if dtype == "auto" else jnp.dtype(dtype))
        _, hf_layout, _ = hf_keymap.PARAMS[name]
        for tensor in hf_tensor_names(name, config):
            entries.append((tensor, hf_shape(hf_layout, dims), out_dtype))
    if progress is not None:
        progress.start(len(stored), sum(math.prod(e[1]) * e[2].itemsize for e in entries))
    out_dtypes = {e[0]: e[2] for e in entries}

    def tensors():
        for name, array in iter_host_params(path, config):
            hf_name, hf_layout, proj_layout = hf_keymap.PARAMS[name]
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
            json.dumps(_generation_config(config), indent=2) + "\n"
        )
    replace_dir(tmp, out_dir)
    return out_dir


def _export_tokenizer_files(path: epath.Path, tokenizer: str | None) -> dict[str, str]:
    source = tokenizer or find_tokenizer(path)
    if source is None:
        raise CheckpointError(
            f"{path} has no tokenizer to ship with the export; pass one with --tokenizer"
        )
    source = epath.Path(source)
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


def _stored_dtypes(path: epath.Path, config: LlamaConfig) -> dict[str, np.dtype]:
    """Each parameter's dtype as stored, in the model's parameter order (a LoRA run's:
    its base's, with int8 kernels merged into the base's float dtype)."""
    info = lora_info(path)
    if info is not None:
        base = _stored_dtypes(epath.Path(info["base"]["path"]), config)
        float_dtype = base["final_norm.scale"]
        return {n: float_dtype if dt == np.int8 else dt for n, dt in base.items()}
    _, abstract = abstract_params(config, sharding.create_mesh(devices=jax.devices()[:1]))
    names = list(_flatten(abstract))
    if detect(path) == "hf":
        reader = HFReader(str(path), config)
        reader.check(names)
        return {
            n: reader.tensors[t].dtype(t) for n in names for t in [hf_tensor_names(n, config)[0]]
        }
    item_dir, key = _params_source(path)
    saved = _orbax_tree(item_dir)
    saved = _flatten(saved[key] if key is not None else saved)
    _check_shapes(_nest(saved), abstract, item_dir)
    return {n: np.dtype(saved[n].dtype) for n in names}


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
    """Writes a quantized model directory from any float model directory.

    The float parameters are read into their shards on `mesh`, quantized there by one
    jitted function whose outputs carry the quantized model's shardings, and written one
    parameter at a time. Norms, the embedding and the LM head keep their stored dtype.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    path = epath.Path(path)
    config = read_config(path)
    qopts = _quant_options(config, mode, quantize_head, quantize_embed)
    already = quantization(path)
    if already is not None:
        raise CheckpointError(f"{path} is already quantized ({already}); quantize its float source")
    files = _export_tokenizer_files(path, tokenizer)
    float_dtype = _stored_dtypes(path, config)["embed.embedding"]
    _, float_abstract = abstract_params(config, mesh, rules, dtype=float_dtype)
    params = load_params(path, config, float_abstract)
    _, q_abstract = abstract_params(config, mesh, rules, dtype=float_dtype, **qopts)
    q_params = jax.jit(
        lambda p: quant.quantize_params(p, head=quantize_head, embed=quantize_embed),
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
            "source": {"kind": detect(path), "path": str(path.resolve())},
            "dtype": str(float_dtype),
            "sparsity": read_metadata(path).get("sparsity"),
            **_quant_metadata(qopts),
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )


def prune_dir(
    path,
    out_dir,
    cfg: prune.PruneConfig,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    tokenizer: str | None = None,
    overwrite: bool = False,
    on_param: Callable[[str, jax.Array], None] | None = None,
) -> tuple[epath.Path, dict[str, Any]]:
    """One-shot magnitude pruning of any float model directory into a converted one.

    The parameters are read into their shards on `mesh`; the masks for `cfg`'s final
    sparsity are computed there (no array is gathered) and applied, and the result is
    written one parameter at a time with metadata.json "sparsity" (pattern, scope,
    overall and per-layer fractions). Returns (out_dir, that sparsity record).
    """
    out_dir = check_out_dir(out_dir, overwrite)
    path = epath.Path(path)
    config = read_config(path)
    already = quantization(path)
    if already is not None:
        raise CheckpointError(f"{path} is quantized ({already}); prune its float source")
    files = _export_tokenizer_files(path, tokenizer)
    dtype = _stored_dtypes(path, config)["embed.embedding"]
    _, abstract = abstract_params(config, mesh, rules, dtype=dtype)
    try:
        paths = prune.pruned_paths(cfg, abstract)
    except prune.PruneError as e:
        raise CheckpointError(str(e)) from e
    params = load_params(path, config, abstract)
    last = len(cfg.points()) - 1

    def apply(p):
        masks = prune.compute_masks(cfg, p, paths, last)
        return prune.apply_masks(p, masks, p), masks

    params, masks = jax.jit(apply, donate_argnums=0)(params)
    report = prune.sparsity_report(masks)
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
            "source": {"kind": detect(path), "path": str(path.resolve())},
            "dtype": str(dtype),
            "sparsity": record,
        },
        files=files,
        overwrite=overwrite,
        on_param=on_param,
    )
    return out, record


def _quant_options(config: LlamaConfig, mode, head: bool, embed: bool) -> dict[str, Any]:
    """Checked `abstract_params` quantization arguments."""
    if mode is None:
        if head or embed:
            raise CheckpointError("quantize_head / quantize_embed need a quantization mode")
        return {}
    try:
        quant.check_mode(mode)
    except quant.QuantizationError as e:
        raise CheckpointError(str(e)) from e
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
