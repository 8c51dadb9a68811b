"""LoRA: low-rank adapters on the block projections, trained over a frozen base.

An adapted projection is the same `layers.Dense` holding two more variables of type
`nnx.LoRAParam` (a subclass of `nnx.Param`) beside its unchanged base parameters:
`lora_a[L, in..., r]` and `lora_b[L, r, out...]`. The module tree and every base
parameter path stay as in the plain model (`layers.attn.q_proj.kernel`, and
`kernel_scale` for an int8 base); the adapters sit at `layers.attn.q_proj.lora_a` /
`lora_b`, are selected with the `nnx.LoRAParam` filter, and are sharded like their
kernel: A by the kernel's input names, B by its output names, the rank axis
unsharded, `layers` leading. The layer computes

    y = base(x) + (alpha / r) * dropout(x) A B

with the adapter path in the compute dtype; an int8 base still goes through
`quant.int8_dot_general`. A starts as PEFT's (uniform in +-1/sqrt(fan_in)), B at zero.

Targets are block projections named by a comma-separated list of patterns, each
matching a projection when it equals its module path or a dot-separated suffix of it
(`q_proj`, `attn.q_proj`, `layers.attn.q_proj.kernel`) or fully matches its module or
kernel path as a regex (`layers\\.mlp\\..*`); "all-linear" takes all seven, as PEFT's
option of that name does (the LM head is not offered). The default, "q_proj,v_proj",
is PEFT's for LLaMA.

Dropout masks are drawn per row from (seed, step, the row's index in the global
batch), folded per layer and projection, so they do not depend on the mesh or on how
gradient accumulation splits the batch.

`merge` folds adapters into their base: W + (alpha / r) * A B in float32, cast back to
the base's dtype; an int8 base is dequantized first, and the merged model is a float
model (float32 kernels).

Training (the `train.Lora` recipe) holds only the adapters in its state, optimizer state and
checkpoints, with the frozen base a separate argument of the step; the checkpoint
metadata names the base and its fingerprint, and `model_dir` reads such a run as the
merged model (`model_dir.load_lora_run`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from llama_jax import sharding
from llama_jax.compress import quant
from llama_jax.errors import ConfigError
from llama_jax.nn import LORA_TARGETS, Llama, LoraConfig

DEFAULT_TARGETS = "q_proj,v_proj"
ALL_LINEAR = "all-linear"
ADAPTERS = ("lora_a", "lora_b")
SETTINGS = ("rank", "alpha", "dropout", "targets")


def _matches(pattern: str, regex: re.Pattern, module_path: str) -> bool:
    paths = (module_path, module_path + ".kernel")
    return any(p == pattern or p.endswith("." + pattern) or regex.fullmatch(p) for p in paths)


def resolve_targets(spec: str) -> tuple[str, ...]:
    """Target patterns (see the module docstring) -> the module paths they select, in
    LORA_TARGETS order. Every pattern must select at least one projection."""
    if spec.strip() == ALL_LINEAR:
        return LORA_TARGETS
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns:
        raise ConfigError(f"lora.targets={spec!r} names no projection")
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"lora.targets: {pattern!r} is not a name or a regex ({e})") from None
        hits = [t for t in LORA_TARGETS if _matches(pattern, regex, t)]
        if not hits:
            raise ConfigError(
                f"lora.targets: {pattern!r} matches no block projection; the projections "
                f"are {', '.join(LORA_TARGETS)} (give names such as 'q_proj', dotted "
                f"suffixes, regexes over these paths, or '{ALL_LINEAR}')"
            )
        chosen.update(hits)
    return tuple(t for t in LORA_TARGETS if t in chosen)


def parse_lora(section: Mapping[str, Any] | None) -> LoraConfig | None:
    """A LoraConfig from a config's `lora` block (rank, alpha, dropout, targets); None
    when LoRA is off (rank 0)."""
    if section is None:
        return None
    unknown = sorted(set(section) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"lora: unknown option(s) {unknown}; expected {list(SETTINGS)}")
    rank = section["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"lora.rank={rank!r} must be an integer >= 0 (0 turns LoRA off)")
    if rank == 0:
        return None
    targets = resolve_targets(section["targets"])
    return LoraConfig(
        rank=rank, alpha=section["alpha"], dropout=section["dropout"], targets=targets
    )


def to_meta(cfg: LoraConfig) -> dict[str, Any]:
    """The JSON form of a LoraConfig kept in checkpoint and model metadata."""
    return {k: list(v) if k == "targets" else v for k, v in dataclasses.asdict(cfg).items()}


def from_meta(meta: Mapping[str, Any]) -> LoraConfig:
    """The LoraConfig of a `to_meta` record."""
    return LoraConfig(
        rank=meta["rank"],
        alpha=meta["alpha"],
        dropout=meta["dropout"],
        targets=tuple(meta["targets"]),
    )


def abstract_model(
    make_model: Callable[[], Llama], mesh, rules=sharding.DEFAULT_RULES
) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The graphdef of a LoRA-adapted model (its full parameter dict, base and adapters
    together, merges into it) and its adapters as a nested dict of ShapeDtypeStructs
    carrying their shardings on `mesh`."""
    model = nnx.eval_shape(make_model)
    graphdef, _ = nnx.split(model)
    adapters = nnx.state(model, nnx.LoRAParam)
    return graphdef, sharding.abstract_arrays(adapters, mesh, rules)


def init_adapters(make_model: Callable[[], Llama], abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Freshly initialised adapters, created in the shardings of `abstract` (from
    `abstract_model`). The base parameters the model would build are never computed:
    they are not outputs of the jit, so XLA drops them."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    return jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(make_model(), nnx.LoRAParam)), out_shardings=shardings
    )()


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
    """The adapted model's parameter dict: the base's and the adapters' leaves together."""
    flat = traverse_util.flatten_dict(dict(base))
    flat_adapters = traverse_util.flatten_dict(dict(adapters))
    clash = flat.keys() & flat_adapters.keys()
    if clash:
        raise ConfigError(f"the base already holds adapter parameters: {sorted(clash)[:3]}")
    return traverse_util.unflatten_dict({**flat, **flat_adapters})


def dropout_keys(seed: int, step: jax.Array, rows_B: jax.Array) -> jax.Array:
    """PRNG keys[B] for the adapters' dropout from (seed, int32[] step, int32[B] global
    row indices)."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows_B)


def merge_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """kernel + scale * A B, added in float32 and cast to the kernel's dtype.

    kernel: float[*lead, *in, *out]; a: [*lead, *in, r]; b: [*lead, r, *out], where lead
    is the stacked layer axis or nothing."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    num_in = a.ndim - 1 - lead
    lead_shape = kernel.shape[:lead]
    fan_in = math.prod(kernel.shape[lead : lead + num_in])
    a2 = a.astype(jnp.float32).reshape(*lead_shape, fan_in, a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*lead_shape, b.shape[lead], -1)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(
    base_params: Mapping[str, Any], adapters: Mapping[str, Any], config: LoraConfig
) -> dict[str, Any]:
    """Plain model parameters with the adapters folded in: each target kernel becomes
    W + (alpha / r) * A B (float32 sum, cast back to W's dtype).

    base_params: the base model's nested parameter dict (float, or int8 with `*_scale`
    entries: it is dequantized first, so the result is the float model's tree with
    float32 kernels). adapters: `lora_a` / `lora_b` for exactly `config.targets`."""
    flat = traverse_util.flatten_dict(dict(adapters), sep=".")
    wanted = {f"{t}.{name}" for t in config.targets for name in ADAPTERS}
    if flat.keys() != wanted:
        raise ConfigError(
            f"the adapters hold {sorted(flat)}, but the LoRA config targets {list(config.targets)}"
        )
    base = traverse_util.flatten_dict(quant.dequantize_params(base_params), sep=".")
    for t in config.targets:
        kernel = f"{t}.kernel"
        base[kernel] = merge_kernel(
            base[kernel], flat[f"{t}.lora_a"], flat[f"{t}.lora_b"], config.scale
        )
    return traverse_util.unflatten_dict(base, sep=".")
