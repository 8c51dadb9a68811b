"""Leaf NNX modules: Embed, RMSNorm, Dense (with a `dot_general` hook and optional LoRA
adapters) and RoPE.

Parameters carry logical axis names (`out_sharding` metadata); `sharding.py`
maps them to mesh axes. Nothing here names a mesh axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError

DotGeneral = Callable[..., jax.Array]


def _param(value: jax.Array, names: Sequence[str | None], kind=nnx.Param) -> nnx.Param:
    # eager_sharding=False: shardings are applied by `jax.jit(out_shardings=...)`
    # when a model is materialised on a mesh, not at construction.
    return kind(value, out_sharding=tuple(names), eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the Dense modules whose paths are in `targets` (module
    paths such as "layers.attn.q_proj"; `lora.resolve_targets` turns patterns into
    them): y = base(x) + (alpha / rank) * dropout(x) A B."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def at(self, path: str) -> LoraConfig | None:
        """This config if the module at `path` is a target, else None."""
        return self if path in self.targets else None


def fold_keys(keys_B: jax.Array | None, i: int) -> jax.Array | None:
    """Per-row dropout keys[B] folded with `i`, so sub-modules draw independent masks;
    None stays None (no dropout)."""
    if keys_B is None:
        return None
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)


class Embed(nnx.Module):
    """Token embedding `embedding[V, D]`; `attend` is the tied LM head.

    With `quantized=True` the table is int8 with a float32 `embedding_scale[V]` (one
    per row, which is one per output channel of the tied head)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
        quantized: bool = False,
    ):
        names = ("vocab", "embed")
        if quantized:
            self.embedding = _param(jnp.zeros((vocab_size, embed_dim), jnp.int8), names)
            self.embedding_scale = _param(jnp.ones((vocab_size,), jnp.float32), ("vocab",))
        else:
            init = jax.nn.initializers.normal(init_std)
            self.embedding = _param(
                init(rngs.params(), (vocab_size, embed_dim), param_dtype), names
            )
            self.embedding_scale = None
        self.dtype = dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """int[B, T] -> dtype[B, T, D]."""
        rows = jnp.take(self.embedding[...], tokens_BT, axis=0)
        if self.embedding_scale is None:
            return rows.astype(self.dtype)
        scale = jnp.take(self.embedding_scale[...], tokens_BT, axis=0)[..., None]
        return (rows.astype(jnp.float32) * scale).astype(self.dtype)

    def attend(self, x_BTD: jax.Array, out_dtype=None) -> jax.Array:
        """dtype[B, T, D] -> out_dtype (default dtype)[B, T, V] against the embedding
        matrix; out_dtype=float32 keeps the accumulator's precision for losses."""
        out_dtype = out_dtype or self.dtype
        if self.embedding_scale is None:
            return jnp.einsum(
                "BTD,VD->BTV",
                x_BTD,
                self.embedding[...].astype(self.dtype),
                preferred_element_type=out_dtype,
            )
        acc = jnp.einsum(
            "BTD,VD->BTV",
            x_BTD,
            self.embedding[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return (acc * self.embedding_scale[...]).astype(out_dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 as transformers does, then cast back."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.scale = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """dtype[..., D] -> dtype[..., D]."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class Dense(nnx.Module):
    """Contracts the last `len(in_shape)` axes of x with `kernel[*in_shape, *out_shape]`.

    The contraction goes through `dot_general` (default `jax.lax.dot_general`), the
    hook quantization replaces. A floating kernel is cast to the compute dtype before
    the hook. With `quantized=True` the kernel is stored as int8 with a float32
    `kernel_scale[*out_shape]` beside it; both reach the hook as stored
    (`dot_general(..., scale=kernel_scale)`), which applies the scale to the output.

    With `lora` the module also holds `lora_a[*in_shape, r]` and `lora_b[r, *out_shape]`
    (`nnx.LoRAParam`, in param_dtype) and adds (alpha / r) * dropout(x) A B, computed in
    the compute dtype with plain `lax.dot_general` whatever the base kernel's storage.
    A is initialised as PEFT does (uniform in +-1/sqrt(fan_in), torch's kaiming-uniform
    with a=sqrt(5)) and B with zeros, so a fresh adapter changes nothing. The base
    parameters keep their paths.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        in_names: Sequence[str | None],
        out_names: Sequence[str | None],
        use_bias: bool = False,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        init_std: float,
        rngs: nnx.Rngs,
        dot_general: DotGeneral = jax.lax.dot_general,
        quantized: bool = False,
        lora: LoraConfig | None = None,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        names = (*in_names, *out_names)
        if quantized:
            # Filled by quantizing a float model or by loading a quantized checkpoint.
            self.kernel = _param(jnp.zeros(in_shape + out_shape, jnp.int8), names)
            self.kernel_scale = _param(jnp.ones(out_shape, jnp.float32), out_names)
            key = rngs.params() if lora is not None else None
        else:
            key = rngs.params()
            init = jax.nn.initializers.normal(init_std)
            self.kernel = _param(init(key, in_shape + out_shape, param_dtype), names)
            self.kernel_scale = None
        self.bias = _param(jnp.zeros(out_shape, param_dtype), out_names) if use_bias else None
        if lora is None:
            self.lora_a = self.lora_b = None
        else:
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            # Folded from the kernel's key rather than drawn from `rngs`, so adding
            # adapters leaves every base parameter's random init as it was.
            a = jax.random.uniform(
                jax.random.fold_in(key, 1), in_shape + (lora.rank,), param_dtype, -bound, bound
            )
            # The rank axis is never sharded: it is small, and both products contract it.
            self.lora_a = _param(a, (*in_names, None), nnx.LoRAParam)
            self.lora_b = _param(
                jnp.zeros((lora.rank,) + out_shape, param_dtype), (None, *out_names), nnx.LoRAParam
            )
        self.lora = lora
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.dot_general = dot_general

    def __call__(self, x: jax.Array, out_dtype=None, dropout_keys=None) -> jax.Array:
        """dtype[..., *in_shape] -> out_dtype (default dtype)[..., *out_shape].

        dropout_keys: PRNG keys[B], one per row of x's leading (batch) axis, for the
        LoRA dropout; None applies none (inference)."""
        kernel = self.kernel[...]
        if jnp.issubdtype(kernel.dtype, jnp.floating):
            kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.num_in, x.ndim)), tuple(range(self.num_in)))
        out_dtype = out_dtype or self.dtype
        dims = (contract, ((), ()))
        if self.kernel_scale is None:
            y = self.dot_general(x, kernel, dims, preferred_element_type=out_dtype)
        else:
            y = self.dot_general(
                x, kernel, dims, preferred_element_type=out_dtype, scale=self.kernel_scale[...]
            )
        if self.lora is not None:
            y = y + self._adapter(x, dims, out_dtype, dropout_keys).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(out_dtype)

    def _adapter(self, x, dims, out_dtype, dropout_keys):
        if dropout_keys is not None and self.lora.dropout > 0:
            keep = 1.0 - self.lora.dropout
            mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(dropout_keys)
            x = jnp.where(mask, x / keep, 0).astype(x.dtype)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        h = jax.lax.dot_general(x, a, dims, preferred_element_type=self.dtype)
        h = (h * self.lora.scale).astype(self.dtype)
        rank_dims = (((h.ndim - 1,), (0,)), ((), ()))
        return jax.lax.dot_general(h, b, rank_dims, preferred_element_type=out_dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """float32[H/2] inverse frequencies, with linear or llama3 scaling applied.

    Bit-identical to transformers' `inv_freq` (float32, its order of operations): a
    one-ulp difference grows into visible logit error at long positions.
    """
    # jnp's float32 pow on the CPU matches torch's (numpy's does not); compile-time eval
    # because models are often built under tracing. The rest is numpy float32, which XLA
    # cannot rewrite (x / c -> x * 1/c) away from torch's rounding.
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
        h = config.head_dim
        exponent = jnp.arange(0, h, 2).astype(jnp.float32) / h
        inv_freq = np.asarray(1.0 / (jnp.float32(config.rope_theta) ** exponent), np.float32)
    f32 = np.float32
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / f32(s.factor)
    if s.rope_type != "llama3":
        raise ConfigError(f"rope_type={s.rope_type!r} is not supported")
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar; so do we.
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(s.factor), inv_freq)
    smooth = ((f32(1) / wavelen) * f32(old_len) - f32(s.low_freq_factor)) / f32(
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions_BT: jax.Array, inv_freq: Sequence[float]) -> jax.Array:
    """Rotates halves (x1, x2) of the head dim by angle position * inv_freq.

    x: dtype[B, T, N, H] or dtype[B, T, K, H] (queries or keys); positions: int[B, T];
    inv_freq: H / 2 frequencies. The rotation runs in float32 and the result is cast
    back to x's dtype.
    """
    # [B, T, H/2]: one angle per position and frequency, broadcast over the heads.
    angle = positions_BT.astype(jnp.float32)[..., None] * np.asarray(inv_freq, np.float32)
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
