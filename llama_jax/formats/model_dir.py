"""Model directories: one handle for reading any kind of model.

Three kinds of directory hold a model, and `ModelDir.open` tells them apart once:

- `hf`: a transformers `save_pretrained` directory (config.json, safetensors).
- `converted`: this project's layout, written by `dir_writer.write_model_dir`:
  `config.json` (a LlamaConfig), `params/` (an Orbax checkpoint whose `state/` item is
  the parameter tree), tokenizer files, `generation_config.json` and `metadata.json`
  (source, dtype, quantization, sparsity). An int8 directory is a converted one whose
  metadata names its quantization.
- `run`: a training or distillation workdir (`checkpoints/<step>/`), or one step
  directory in it; the latest intact step is read (`runs.latest_intact_step`),
  parameters only. A LoRA run's checkpoints hold adapters only: its handle loads the
  base its metadata records, checks that base's fingerprint, and merges the adapters
  onto it (the LoRA logic is `lora_dir`'s).

Everything a reader needs (kind, config, metadata, quantization, LoRA base, tokenizer)
is resolved when the handle opens; parameters are read straight into the shardings
asked for, whatever mesh wrote them. Writing is `dir_writer`'s; directory-to-directory
transforms are `transforms`'.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llama_jax import compress, errors, nn, paths, sharding
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


def _read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: expected a JSON object ({e})") from e


def _detect(path: epath.Path) -> str:
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, expected a model directory")
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


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDir:
    """A model directory of any kind, resolved once (`ModelDir.open`).

    path: absolute (a URI such as gs://... unchanged); kind: 'hf', 'converted' or
    'run'; config: the architecture; metadata: a converted directory's metadata.json,
    a run's latest intact step's `meta` item ({} for Hugging Face); step_dir: that
    step's directory (runs only); given: the path as the caller spelled it (reports
    name the model by it)."""

    path: epath.Path
    kind: str
    config: LlamaConfig
    metadata: Mapping[str, Any]
    step_dir: epath.Path | None = None
    given: str = ""

    @classmethod
    def open(cls, path) -> ModelDir:
        """The handle of the model directory at `path` (a ModelDir is returned as it is).
        Raises CheckpointError when it is missing, a file, of no known kind, or its
        config cannot be read."""
        if isinstance(path, ModelDir):
            return path
        given, path = path, paths.absolute(path)
        kind = _detect(path)
        step_dir = None
        try:
            if kind == "run":
                step_dir = runs.latest_step_dir(path)
                metadata = runs.read_meta(step_dir)
                if "model" not in metadata:
                    raise CheckpointError(
                        f"{step_dir}: the checkpoint metadata has no model config"
                    )
                config = LlamaConfig.from_dict(metadata["model"])
            else:
                if not (path / "config.json").exists():
                    raise CheckpointError(f"{path} has no config.json")
                config = LlamaConfig.from_json_file(path / "config.json")
                metadata = _read_json(path / METADATA) if kind == "converted" else {}
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from e
        return cls(
            path=path,
            kind=kind,
            config=config,
            metadata=metadata,
            step_dir=step_dir,
            given=str(given),
        )

    def __str__(self) -> str:
        return str(self.path)

    @property
    def quantization(self) -> str | None:
        """The quantization mode of the stored weights (None: float)."""
        return self.metadata.get("quantization") if self.kind == "converted" else None

    @property
    def lora(self) -> dict[str, Any] | None:
        """A LoRA run's `lora` entry (the LoRA settings, the base's path and
        fingerprint), or None for any other model directory."""
        return self.metadata.get("lora") if self.kind == "run" else None

    @property
    def sparsity(self) -> Any:
        """The sparsity a converted directory's metadata records (None otherwise)."""
        return self.metadata.get("sparsity") if self.kind == "converted" else None

    def quant_kwargs(self) -> dict[str, Any]:
        """`compress.model_kwargs` arguments of the model as stored."""
        meta = self.metadata if self.kind == "converted" else {}
        return dict(
            quantization=meta.get("quantization"),
            quantize_head=bool(meta.get("quantized_head")),
            quantize_embed=bool(meta.get("quantized_embed")),
        )

    def abstract(self, mesh, rules=sharding.DEFAULT_RULES, **kwargs):
        """(graphdef, abstract parameters with shardings on `mesh`) of the model as
        stored: int8 where the directory is quantized; a LoRA run's merged float model.
        Keyword arguments (dtype, param_dtype, scan_layers, ...) go to
        `nn.abstract_params`."""
        quant = compress.model_kwargs(**self.quant_kwargs())
        return nn.abstract_params(self.config, mesh, rules, **kwargs, **quant)

    def base(self, moved_to=None) -> ModelDir:
        """A LoRA run's base model directory: the recorded one, or `moved_to`."""
        return ModelDir.open(lora_dir.locate_base(self.path, self.lora, moved_to))

    # Parameters.

    def _params_source(self) -> tuple[epath.Path, str | None]:
        """The Orbax item directory holding the parameters, and the key they sit under."""
        if self.kind == "converted":
            return self.path / PARAMS / PARAMS_ITEM, None
        return self.step_dir / runs.STATE, "params"

    def load_params(self, abstract: Mapping[str, Any], *, base_dir=None) -> dict[str, Any]:
        """The parameters, read into the shardings and dtypes of `abstract` (a nested
        dict of ShapeDtypeStructs, see `abstract`).

        A Hugging Face directory is read slice by slice (each host reads only its
        devices' slices); Orbax checkpoints are restored directly into the target
        shardings; a LoRA run's adapters are merged onto its base (`base_dir` if the
        base moved), whose fingerprint must match the recorded one."""
        if self.lora is not None:
            return self._load_lora_run(abstract, base_dir)
        if self.kind != "hf":
            return _restore(*self._params_source(), abstract)
        flat = flatten(abstract)
        if any(k.endswith(compress.SCALE_SUFFIX) for k in flat):
            raise CheckpointError(
                f"{self.path} is a float Hugging Face directory; convert it with "
                "convert.hf_to_orbax --quantize=int8 to load it quantized"
            )
        reader = HFReader(str(self.path), self.config)
        reader.check(flat)
        out = {}
        for name, array in sharding.sharded_arrays(abstract, reader.read):
            out[name] = array
            reader.release()
        return nest(out)

    def load(
        self,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        mesh=None,
        rules=sharding.DEFAULT_RULES,
        **model_kwargs,
    ) -> Llama:
        """A `Llama` with these parameters. dtype: compute dtype; param_dtype: stored
        dtype (default: dtype). mesh: where to place the parameters (default: the
        first device). Other keyword arguments go to `Llama` (scan_layers,
        remat_policy, attention_impl). A quantized directory gives the quantized model
        (its float parameters in param_dtype)."""
        if mesh is None:
            mesh = sharding.create_mesh(devices=jax.devices()[:1])
        graphdef, abstract = self.abstract(
            mesh, rules, dtype=dtype, param_dtype=param_dtype, **model_kwargs
        )
        params = self.load_params(abstract)
        state = nnx.split(nnx.eval_shape(lambda: nnx.merge(graphdef, abstract)))[1]
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    def fingerprint(self, params=None) -> dict[str, Any]:
        """`fingerprint.fingerprint` of this model: of `params` when they are already
        loaded from it, else read on the first device."""
        if params is None:
            mesh = sharding.create_mesh(devices=jax.devices()[:1])
            params = self.load_params(self.abstract(mesh, dtype=self.stored_float_dtype)[1])
        return fingerprint.fingerprint(self.config, params)

    def iter_host_params(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (dotted path, numpy array in its stored dtype) one parameter at a
        time, in the model's parameter order, so only one parameter is ever in host
        memory (a LoRA run's merged onto its base)."""
        if self.lora is not None:
            yield from self._iter_lora_run()
            return
        _, abstract = self.abstract(sharding.create_mesh(devices=jax.devices()[:1]))
        names = list(flatten(abstract))
        if self.kind == "hf":
            reader = HFReader(str(self.path), self.config)
            reader.check(names)
            for name in names:
                tensor_name = hf_tensor_names(name, self.config)[0]
                dtype = reader.tensors[tensor_name].dtype(tensor_name)
                yield name, reader.read(name, None, dtype)
                reader.release()
            return
        item_dir, key = self._params_source()
        saved = _orbax_tree(item_dir)
        saved = saved[key] if key is not None else saved
        _check_shapes(saved, abstract, item_dir)
        saved_flat = flatten(saved)
        for name in names:
            target = nest({name: np.zeros((), dtype=np.dtype(saved_flat[name].dtype))})
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

    @functools.cached_property
    def stored_dtypes(self) -> dict[str, np.dtype]:
        """Each parameter's dtype as stored, in the model's parameter order (a LoRA
        run's: its base's, with int8 kernels merged into the base's float dtype)."""
        if self.lora is not None:
            base = self.base().stored_dtypes
            float_dtype = base["final_norm.scale"]
            return {n: float_dtype if dt == np.int8 else dt for n, dt in base.items()}
        _, abstract = nn.abstract_params(
            self.config, sharding.create_mesh(devices=jax.devices()[:1])
        )
        names = list(flatten(abstract))
        if self.kind == "hf":
            reader = HFReader(str(self.path), self.config)
            reader.check(names)
            return {
                n: reader.tensors[t].dtype(t)
                for n in names
                for t in [hf_tensor_names(n, self.config)[0]]
            }
        item_dir, key = self._params_source()
        saved = _orbax_tree(item_dir)
        saved = flatten(saved[key] if key is not None else saved)
        _check_shapes(nest(saved), abstract, item_dir)
        return {n: np.dtype(saved[n].dtype) for n in names}

    @property
    def stored_float_dtype(self) -> np.dtype:
        """The dtype the float parameters are stored in (a norm scale's: never
        quantized)."""
        return self.stored_dtypes["final_norm.scale"]

    def _load_lora_run(self, abstract: Mapping[str, Any], base_dir) -> dict[str, Any]:
        base = self.base(base_dir)
        mesh = jax.tree.leaves(abstract)[0].sharding.mesh
        _, abstract_base = base.abstract(mesh, dtype=base.stored_float_dtype)
        base_params = base.load_params(abstract_base)
        lora_dir.check_lora_base(self.lora, base.fingerprint(base_params), base.path)
        adapters = _restore(
            self.step_dir / runs.STATE,
            "params",
            lora_dir.adapters_abstract(self.config, self.lora, mesh),
        )
        return lora_dir.merge_onto_base(base_params, adapters, self.lora, abstract)

    def _iter_lora_run(self) -> Iterator[tuple[str, np.ndarray]]:
        base = self.base()
        lora_dir.check_base_config(self.lora, base.config, base.path)
        mesh = sharding.create_mesh(devices=jax.devices()[:1])
        abstract_adapters = lora_dir.adapters_abstract(self.config, self.lora, mesh)
        adapters = flatten(
            jax.device_get(_restore(self.step_dir / runs.STATE, "params", abstract_adapters))
        )
        _, base_abstract = base.abstract(mesh)
        _, float_abstract = nn.abstract_params(self.config, mesh)
        yield from lora_dir.merged_host_params(
            self.lora,
            base.path,
            adapters,
            base.iter_host_params(),
            base_names=set(flatten(base_abstract)),
            names=list(flatten(float_abstract)),
        )

    # Tokenizer.

    @functools.cached_property
    def tokenizer_path(self) -> str | None:
        """A directory or file holding the model's tokenizer, or None. A run names the
        tokenizer it trained with in its config; a LoRA run trained on pre-tokenized
        data has its base's."""
        if self.kind != "run":
            has_own = any((self.path / name).exists() for name in TOKENIZER_FILES[:2])
            return str(self.path) if has_own else None
        found = self.metadata.get("config", {}).get("data", {}).get("tokenizer") or None
        if found and epath.Path(found).exists():
            return found
        base = (self.lora or {}).get("base", {}).get("path")
        return ModelDir.open(base).tokenizer_path if base and epath.Path(base).exists() else None

    def tokenizer(self) -> Tokenizer:
        """The model's Tokenizer; raises CheckpointError if it has none."""
        found = self.tokenizer_path
        if found is None:
            raise CheckpointError(
                f"{self.path} has no tokenizer (looked for {TOKENIZER_FILES[0]} and "
                f"{TOKENIZER_FILES[1]}, or a run's data.tokenizer)"
            )
        return load_tokenizer(found)

    def tokenizer_files(self) -> dict[str, str]:
        """The tokenizer and generation files beside the model's tokenizer, name -> path
        ({} when it has no tokenizer)."""
        found = self.tokenizer_path
        return tokenizer_files(found) if found and epath.Path(found).is_dir() else {}


def load_tokenizer(path) -> Tokenizer:
    """The Tokenizer of a tokenizer file, a directory holding tokenizer files, or a
    model directory of any kind (`ModelDir.tokenizer`)."""
    if isinstance(path, ModelDir):
        return path.tokenizer()
    path = paths.absolute(path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if path.is_dir() and any((path / n).exists() for n in TOKENIZER_FILES[:2]):
        return Tokenizer.from_dir(str(path))
    return ModelDir.open(path).tokenizer()


def tokenizer_files(directory) -> dict[str, str]:
    """The tokenizer and generation files present in `directory`, name -> path."""
    directory = epath.Path(directory)
    return {
        name: str(directory / name)
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG)
        if (directory / name).exists()
    }


def load_model(
    path,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    **model_kwargs,
) -> tuple[Llama, LlamaConfig]:
    """A `Llama` from any kind of model directory, and its config (`ModelDir.load`)."""
    model_dir = ModelDir.open(path)
    model = model_dir.load(
        dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs
    )
    return model, model_dir.config


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
