"""LoRA runs as model directories: the base their adapters belong to, and the adapters
merged onto it.

A LoRA run's checkpoints hold adapters only; their metadata's `lora` entry (see
`model_dir.lora_info`) records the LoRA settings and the base's path and fingerprint.
`model_dir` reads the run and its base; this module checks that the base is the one the
adapters were trained on and merges them, either in the parameters' shardings
(`merge_onto_base`) or streamed on the host one parameter at a time
(`merged_host_params`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from llama_jax import compress, paths
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats.fingerprint import (
    config_digest,
    fingerprint_key,
    fingerprint_mismatch,
    host_stats,
    same_stats,
)
from llama_jax.nn import Llama


def _other_base(info: Mapping[str, Any], base_dir, why: str):
    return CheckpointError(
        f"the base at {base_dir} has {why} than the one these LoRA adapters were trained "
        f"on ({info['base']['path']}); use that base, or a new workdir for new adapters"
    )


def check_lora_base(info: Mapping[str, Any], fingerprint: Mapping[str, Any], base_dir) -> None:
    """Raises unless `fingerprint` (`checkpoint.fingerprint` of the model in base_dir)
    is that of the base the adapters of `info` (`model_dir.lora_info`) were trained on."""
    why = fingerprint_mismatch(info["base"]["fingerprint"], fingerprint)
    if why is not None:
        raise _other_base(info, base_dir, why)


def check_base_config(info: Mapping[str, Any], config: LlamaConfig, base_dir) -> None:
    """Raises unless `config` (the architecture in base_dir) is that of the base the
    adapters of `info` were trained on."""
    if info["base"]["fingerprint"]["config_sha256"] != config_digest(config):
        raise _other_base(info, base_dir, "another architecture")


def locate_base(path, info: Mapping[str, Any], moved_to=None) -> epath.Path:
    """The base directory of the LoRA run at `path`: the recorded one, or `moved_to`
    when given; raises if it does not exist."""
    base = paths.absolute(moved_to or info["base"]["path"])
    if not base.exists():
        raise CheckpointError(
            f"{path} holds LoRA adapters for the base {base}, which does not exist; "
            "give its new location (launch.merge_lora --base_dir)"
        )
    return base


def adapters_abstract(config: LlamaConfig, info: Mapping[str, Any], mesh) -> dict[str, Any]:
    """The adapters of `info`'s LoRA settings as a nested dict of ShapeDtypeStructs
    carrying their shardings on `mesh`."""
    lora_cfg = compress.from_meta(info)
    return compress.abstract_model(lambda: Llama(config, lora=lora_cfg, rngs=nnx.Rngs(0)), mesh)[1]


def merge_onto_base(
    base: Mapping[str, Any],
    adapters: Mapping[str, Any],
    info: Mapping[str, Any],
    abstract: Mapping[str, Any],
) -> dict[str, Any]:
    """`lora.merge` of `adapters` onto `base` (float or int8 parameters) by one jitted
    function whose outputs take the shardings and dtypes of `abstract`."""
    lora_cfg = compress.from_meta(info)
    dtypes = jax.tree.map(lambda x: x.dtype, abstract)

    def merge(base, adapters):
        merged = compress.merge(base, adapters, lora_cfg)
        return jax.tree.map(lambda x, dt: x.astype(dt), merged, dtypes)

    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(merge, out_shardings=shardings)(base, adapters)


def merged_host_params(
    info: Mapping[str, Any],
    base_dir,
    adapters: Mapping[str, np.ndarray],
    base_params: Iterable[tuple[str, np.ndarray]],
    *,
    base_names: set[str],
    names: Iterable[str],
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (dotted path, numpy array) of the merged model in the order of `names`
    (the float model's parameters). base_params: the base streamed one parameter at a
    time (`model_dir.iter_host_params`), each checked against the recorded fingerprint;
    base_names: the base's parameter names (int8 kernels with their scales); adapters:
    flat dotted paths. Target kernels are merged layer by layer and int8 ones
    dequantized (float32)."""
    saved = info["base"]["fingerprint"]
    lora_cfg = compress.from_meta(info)
    stream = iter(base_params)
    held: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        while name not in held:
            got, x = next(stream)
            stats = saved["params"].get(fingerprint_key(got))
            if stats is None or not same_stats(stats, host_stats(x)):
                raise _other_base(info, base_dir, f"other weights ({got} differs)")
            held[got] = x
        return held.pop(name)

    for name in names:
        x = take(name)
        scale_name = name + compress.SCALE_SUFFIX
        scale = take(scale_name) if scale_name in base_names else None
        module, _, leaf = name.rpartition(".")
        if leaf == "kernel" and module in lora_cfg.targets:
            a, b = adapters[f"{module}.lora_a"], adapters[f"{module}.lora_b"]
            x = _merge_layers(x, scale, a, b, lora_cfg.scale)
        elif scale is not None:
            dequantized = compress.dequantize_params({name: x, scale_name: scale})
            x = np.asarray(traverse_util.flatten_dict(dequantized, sep=".")[name])
        yield name, x


def _merge_layers(kernel, scale, a, b, lora_scale: float) -> np.ndarray:
    """A stacked kernel [L, in..., out...] (float, or int8 with scale [L, out...]) with
    adapters merged, one layer at a time so only one layer's float32 copy exists."""
    num_in = a.ndim - 2
    out = np.empty(kernel.shape, np.float32 if scale is not None else kernel.dtype)
    for i in range(kernel.shape[0]):
        w = kernel[i]
        if scale is not None:
            w = compress.dequantize(w, scale[i], num_in, stacked=False)
        out[i] = np.asarray(compress.merge_kernel(w, a[i], b[i], lora_scale))
    return out
