"""Int8 weight-only quantization: symmetric, one float32 scale per output channel.

A quantized model is the float model built with `Llama(..., quantized=True,
dot_general=int8_dot_general)`: the same module tree and parameter paths, each
projection's `kernel` stored as int8 with a `kernel_scale` beside it (sharded by the
kernel's output names). The layers hand the int8 kernel and its scale to
`int8_dot_general`, which contracts the activations with the int8 weights (widened to
the compute dtype, float32 accumulation) and scales the output; on GPU, skinny
products (decode) go to the Pallas kernel in `kernels/int8_matmul.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from llama_jax.kernels.int8_matmul import int8_matmul

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
# Decode-sized products (rows of activations) that use the Pallas kernel on GPU.
KERNEL_MAX_M = 64


class QuantizationError(ValueError):
    """An unknown mode, or a checkpoint that cannot be quantized as asked."""


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QuantizationError(f"quantization mode={mode!r} is unknown; expected one of {MODES}")


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


def int8_dot_general(
    x: jax.Array,
    kernel: jax.Array,
    dimension_numbers,
    *,
    preferred_element_type=None,
    scale: jax.Array | None = None,
    precision=None,
    use_kernel: bool | None = None,
) -> jax.Array:
    """`lax.dot_general` for an int8 kernel [in..., out...] with a float32 scale[out...]
    applied to the output. x contracts its trailing axes with the kernel's leading ones
    (the layout `layers.Dense` uses). Accumulates in float32. use_kernel: the Pallas
    kernel (True), XLA (False), or the kernel on GPU for at most KERNEL_MAX_M rows (None)."""
    if scale is None:
        raise QuantizationError("int8_dot_general needs the kernel's scale")
    (x_axes, k_axes), _ = dimension_numbers
    out_dtype = preferred_element_type or x.dtype
    num_in = len(k_axes)
    batch_shape, out_shape = x.shape[: x.ndim - num_in], kernel.shape[num_in:]
    k = math.prod(kernel.shape[:num_in])
    m = math.prod(batch_shape)
    if use_kernel is None:
        use_kernel = jax.devices()[0].platform == "gpu" and m <= KERNEL_MAX_M
    if use_kernel:
        y = int8_matmul(
            x.reshape(m, k),
            kernel.reshape(k, -1),
            scale.reshape(-1),
            out_dtype=jnp.float32,
        )
        return y.reshape(*batch_shape, *out_shape).astype(out_dtype)
    acc = jax.lax.dot_general(
        x,
        kernel.astype(x.dtype),
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return (acc * scale.astype(jnp.float32)).astype(out_dtype)


def model_kwargs(
    quantization: str | None, quantize_head: bool = False, quantize_embed: bool = False
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
        raise QuantizationError("these parameters are already quantized")
    if head and HEAD not in flat:
        raise QuantizationError("head=True, but the model has no separate LM head (tied)")
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
