"""Int8 weight-only quantization: symmetric, one float32 scale per output channel.

A quantized model is the float model built with `Llama(..., quantized=True,
dot_general=int8_dot_general)`: the same module tree and parameter paths, each
projection's `kernel` stored as int8 with a `kernel_scale` beside it (sharded by the
kernel's output names). The layers hand the int8 kernel and its scale to
`int8_dot_general`, which contracts the activations with the int8 weights (widened to
the compute dtype, float32 accumulation) and scales the output; on GPU, skinny
products (decode) go to the Pallas kernel in `kernels/int8_matmul.py`.

The kernel is an opaque custom call to XLA's partitioner: given sharded operands, XLA
would gather the weights onto every device to run it. So on a mesh it runs only under
`shard_map`, and only where that needs no weight movement: when the mesh of
`sharding.activation_sharding` splits none of the parameters' logical axes (the
weights are replicated, e.g. pure data parallelism), each device runs the kernel on its
own rows of the batch. Where the weights are split (FSDP, tensor parallelism), the
product takes the XLA path, which XLA partitions by the weights' own shardings: the
hook receives arrays, not their logical names, so the kernel's partitioning of a split
weight cannot be known here. The same holds for weights placed on a multi-device mesh
outside `activation_sharding` (their mesh is visible while tracing, their partitioning
is not). `kernel_route` makes this decision; an explicit `use_kernel=True` that it
cannot honour without gathering the weights is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from llama_jax import sharding
from llama_jax.errors import ConfigError
from llama_jax.nn import int8_matmul

MODES = ("int8",)

# The projections that are quantized, with how many leading (input) axes their
# stacked kernel [L, in..., out...] contracts.
QUANTIZED_KERNELS: dict[str, int] = {
    "layers.attn.q_proj.kernel": 1,
    "layers.attn.k_proj.kernel": 1,
    "layers.attn.v_proj.kernel": 1,
    "layers.attn.o_proj.kernel": 2,
    "layers.mlp.gate_proj.kernel": 1,
    "layers.mlp.up_proj.kernel": 1,
    "layers.mlp.down_proj.kernel": 1,
}
# Optional ones, with the axes a scale is shared over (their input axes): the untied LM
# head [D, V] and the embedding table [V, D] (one scale per vocabulary entry).
HEAD = "lm_head.kernel"
EMBED = "embed.embedding"
OPTIONAL_AXES: dict[str, tuple[int, ...]] = {HEAD: (0,), EMBED: (1,)}


def reduce_axes(path: str) -> tuple[int, ...]:
    """The input axes of a quantized parameter: its scale has the other axes."""
    if path in QUANTIZED_KERNELS:
        return tuple(range(1, 1 + QUANTIZED_KERNELS[path]))
    return OPTIONAL_AXES[path]


def quantized_paths(*, head: bool = False, embed: bool = False) -> list[str]:
    return [*QUANTIZED_KERNELS, *([HEAD] if head else []), *([EMBED] if embed else [])]


SCALE_SUFFIX = "_scale"
# Scales are absmax * (1 / 127) in float32, a product, because XLA may turn a division
# by a constant into this product anyway: host-side (numpy) quantization then agrees
# with on-device quantization bit for bit.
INV_127 = np.float32(1 / 127)
# Decode-sized products (rows of activations per device) that use the Pallas kernel on GPU.
KERNEL_MAX_M = 64
# The logical axes of the quantized parameters: a mesh that splits any of them shards
# the weights.
_PARAM_AXES = ("layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"quantization mode={mode!r} is unknown; expected one of {MODES}")


def quantize_axes(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one float32 scale per slice over `axes` (the input axes):
    w ~= q * scale, |q| <= 127; an all-zero channel gets scale 1. Returns
    (int8 like w, float32 scale with `axes` removed)."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax * INV_127, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=axes)


def quantize(w: jax.Array, num_in: int, *, stacked: bool = True) -> tuple[jax.Array, jax.Array]:
    """`quantize_axes` for a Dense kernel float[L, in..., out...] (stacked) or
    [in..., out...] with `num_in` input axes: one scale per output channel."""
    first = 1 if stacked else 0
    return quantize_axes(w, tuple(range(first, first + num_in)))


def dequantize(q: jax.Array, scale: jax.Array, num_in: int, *, stacked: bool = True, dtype=None):
    """The inverse of `quantize`: float32 (or dtype) like q."""
    first = 1 if stacked else 0
    s = jnp.expand_dims(scale, tuple(range(first, first + num_in)))
    return (q.astype(jnp.float32) * s).astype(dtype or jnp.float32)


def _batch_axes(x: jax.Array, num_in: int, mesh, rules) -> tuple[str, ...]:
    """The mesh axes that split x's leading (batch) axis: those of the logical 'batch'
    axis, or none where they do not divide it or x has no batch axes."""
    if x.ndim == num_in:
        return ()
    entry = sharding.logical_to_spec(("batch",), x.shape[:1], mesh, rules)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def kernel_route(
    x: jax.Array,
    kernel: jax.Array,
    *,
    num_in: int = 1,
    use_kernel: bool | None = None,
    platform: str | None = None,
) -> str:
    """How `int8_dot_general` contracts x[..., in...] with an int8 kernel[in..., out...]
    (num_in input axes), decided while tracing: 'kernel' (the Pallas kernel), 'shard_map'
    (the kernel on each device's rows of the batch, weights replicated), or 'xla'.

    use_kernel: None picks the kernel on GPU for at most KERNEL_MAX_M rows per device
    where the module docstring's mesh rule allows it; True asks for the kernel and
    raises ConfigError where the rule forbids it; False is 'xla'. platform:
    that of the devices (default: the active mesh's, else the default backend's)."""
    if use_kernel is False:
        return "xla"
    active = sharding.active_mesh()
    rows = math.prod(x.shape[: x.ndim - num_in])
    blocker = ""
    if active is not None and active[0].size > 1:
        mesh, rules = active
        route = "shard_map"
        rows //= math.prod(mesh.shape[a] for a in _batch_axes(x, num_in, mesh, rules))
        if any(sharding.axis_size(mesh, rules, a) > 1 for a in _PARAM_AXES):
            blocker = "the rules of the active mesh split the weights"
    else:
        route = "kernel"
        if jax.typeof(kernel).sharding.mesh.size > 1:
            blocker = "the weights are on a multi-device mesh outside activation_sharding"
    if use_kernel:
        if blocker:
            raise ConfigError(
                f"use_kernel=True, but {blocker}: the Pallas kernel would gather them onto "
                "every device; use_kernel=None takes the XLA path there"
            )
        return route
    if platform is None:
        platform = active[0].devices.flat[0].platform if active else jax.default_backend()
    if blocker or platform != "gpu" or rows > KERNEL_MAX_M:
        return "xla"
    return route


def int8_dot_general(
    x: jax.Array,
    kernel: jax.Array,
    dimension_numbers,
    *,
    preferred_element_type=None,
    scale: jax.Array | None = None,
    precision=None,
    use_kernel: bool | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`lax.dot_general` for an int8 kernel [in..., out...] with a float32 scale[out...]
    applied to the output. x contracts its trailing axes with the kernel's leading ones
    (the layout `layers.Dense` uses). Accumulates in float32. use_kernel: see
    `kernel_route` (None: the kernel on GPU for decode-sized products). interpret: run
    the Pallas kernel in interpret mode (CPU tests)."""
    if scale is None:
        raise ConfigError("int8_dot_general needs the kernel's scale")
    (x_axes, k_axes), _ = dimension_numbers
    out_dtype = preferred_element_type or x.dtype
    num_in = len(k_axes)
    route = kernel_route(x, kernel, num_in=num_in, use_kernel=use_kernel)
    if route == "xla":
        acc = jax.lax.dot_general(
            x,
            kernel.astype(x.dtype),
            dimension_numbers,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return (acc * scale.astype(jnp.float32)).astype(out_dtype)

    def matmul(x, kernel, scale):
        batch_shape, out_shape = x.shape[: x.ndim - num_in], kernel.shape[num_in:]
        k = math.prod(kernel.shape[:num_in])
        y = int8_matmul(
            x.reshape(-1, k),
            kernel.reshape(k, -1),
            scale.reshape(-1),
            out_dtype=jnp.float32,
            interpret=interpret,
        )
        return y.reshape(*batch_shape, *out_shape)

    if route == "shard_map":
        mesh, rules = sharding.active_mesh()
        rows = PartitionSpec(_batch_axes(x, num_in, mesh, rules) or None)
        matmul = jax.shard_map(
            matmul,
            mesh=mesh,
            in_specs=(rows, PartitionSpec(), PartitionSpec()),
            out_specs=rows,
            # pallas_call's output types carry no varying-axes annotation to check.
            check_vma=False,
        )
    return matmul(x, kernel, scale).astype(out_dtype)


def model_kwargs(
    quantization: str | None = None, quantize_head: bool = False, quantize_embed: bool = False
) -> dict[str, Any]:
    """`Llama` keyword arguments for a model stored with this quantization (None: float)."""
    if quantization is None:
        return {}
    check_mode(quantization)
    return dict(
        quantized=True,
        quantize_head=quantize_head,
        quantize_embed=quantize_embed,
        dot_general=int8_dot_general,
    )


def quantize_params(
    params: Mapping[str, Any], *, head: bool = False, embed: bool = False
) -> dict[str, Any]:
    """A float model's parameter dict (nested, stacked layers) -> the quantized model's:
    every QUANTIZED_KERNELS kernel (and the LM head / embedding when asked) as int8 plus
    its `*_scale`; the rest unchanged. Jit it with the quantized model's shardings as
    out_shardings to quantize in place on the devices."""
    flat = traverse_util.flatten_dict(dict(params), sep=".")
    if any(k.endswith(SCALE_SUFFIX) for k in flat):
        raise ConfigError("these parameters are already quantized")
    if head and HEAD not in flat:
        raise ConfigError("head=True, but the model has no separate LM head (tied)")
    targets = set(quantized_paths(head=head, embed=embed))
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if path in targets:
            q, s = quantize_axes(value, reduce_axes(path))
            out[path], out[path + SCALE_SUFFIX] = q, s
        else:
            out[path] = value
    return traverse_util.unflatten_dict(out, sep=".")


def dequantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `quantize_params`: every int8 parameter with a `*_scale` beside it
    becomes float32 (q * scale) and the scales are dropped; the rest is unchanged."""
    flat = traverse_util.flatten_dict(dict(params), sep=".")
    out: dict[str, Any] = {}
    for path, value in flat.items():
        if path.endswith(SCALE_SUFFIX):
            continue
        scale = flat.get(path + SCALE_SUFFIX)
        if scale is None:
            out[path] = value
        else:
            s = jnp.expand_dims(scale.astype(jnp.float32), reduce_axes(path))
            out[path] = value.astype(jnp.float32) * s
    return traverse_util.unflatten_dict(out, sep=".")
