"""Attention kernels behind one interface, and the KV cache.

`attend(q_BTNH, k_BSKH, v_BSKH, ...)` masks by
  * causality over slot indices: query t (at slot `q_offset + t`) sees kv slots <= its own;
  * segments: a query sees only kv slots with its segment id; id 0 is padding, seen by
    nobody (a padding query's output is finite and meaningless).

Implementations:
  * 'xla'    plain einsums, softmax in float32: CPU, the reference, and any shape.
  * 'cudnn'  cuDNN flash attention via `jax.nn.dot_product_attention` (GPU, bf16/fp16).
  * 'splash' Pallas splash attention (TPU), run under `shard_map` on a mesh: batch over
             the mesh axes of the logical 'batch' axis, query heads over those of
             'heads', each kv head kept with its query group. Memory is O(T).
  * 'auto'   cudnn on GPU and splash on TPU where the call fits them, else xla.

'auto' is resolved when the step is traced, by the platform of the mesh in
`sharding.activation_sharding` (the platform of the default backend outside one), so a
step traced on a CPU host for TPU devices (ahead-of-time compilation) gets splash.

Where 'auto' meets a call its kernel cannot serve (a head dim or length the kernel does
not take, an unsupported dtype) it runs 'xla' and logs why, once. A kernel named
explicitly raises `ConfigError` for such a call instead. Decoding over a filled KV
cache (`q_offset` given) always runs 'xla': its queries are a few new tokens against
the whole cache, which the fast kernels here are not written for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from llama_jax import sharding
from llama_jax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@struct.dataclass
class KVCache:
    """Keys and values of all layers for decoding.

    k, v: dtype[L, B, S, K, H] (rotary embedding already applied to k);
    segment_ids: int32[B, S], 0 for empty or padding slots;
    end: int32[] number of slots written (the next write position);
    empty: static; True only for a cache nothing was written to (`zeros`). A call on an
      empty cache (the prefill) attends over its own keys alone, which lets it use the
      fast kernels; the cache it returns is not empty.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    end: jax.Array
    empty: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def zeros(cls, num_layers, batch, max_len, num_kv_heads, head_dim, dtype) -> KVCache:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            end=jnp.zeros((), jnp.int32),
            empty=True,
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def attention_mask(
    q_segment_BT: jax.Array, kv_segment_BS: jax.Array, q_offset: jax.Array | int = 0
) -> jax.Array:
    """bool[B, T, S]: causal over slots, same non-zero segment."""
    t = q_segment_BT.shape[1]
    s = kv_segment_BS.shape[1]
    q_slot = jnp.arange(t)[:, None] + q_offset
    causal_TS = jnp.arange(s)[None, :] <= q_slot
    same_BTS = (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]) & (
        kv_segment_BS[:, None, :] != 0
    )
    return causal_TS[None] & same_BTS


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float) -> jax.Array:
    """Reference attention: scores and softmax in float32. Returns q.dtype[B, T, N, H]."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask_BTS[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BSKH)
    return out.reshape(b, t, n, h)


def _cudnn_unfit(q_BTNH, k_BSKH) -> str | None:
    """Why cuDNN cannot serve this call, or None."""
    h = q_BTNH.shape[-1]
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16) or k_BSKH.dtype != q_BTNH.dtype:
        return f"it takes bfloat16 or float16 inputs, not {q_BTNH.dtype}/{k_BSKH.dtype}"
    if h > 256 or h % 8:
        return f"head dim {h} is not a multiple of 8 up to 256"
    return None


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale, packed):
    """cuDNN flash attention. Unpacked rows use its causal mode (no mask is built);
    packed rows pass the segment mask."""
    if packed:
        mask = attention_mask(q_segment_BT, kv_segment_BS)[:, None]
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=scale, implementation="cudnn"
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=scale, is_causal=True, implementation="cudnn"
    )


# Splash processes whole blocks of 128 lanes; larger blocks are faster when they divide.
_SPLASH_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)
_FLOAT32_PRECISIONS = ("highest", "float32", "tensorfloat32", "bfloat16_3x", "high")


def _splash_unfit(q_BTNH, k_BSKH) -> str | None:
    """Why splash cannot serve this call, or None."""
    t, s, h = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[-1]
    if t != s:
        return f"query length {t} differs from key length {s}"
    if t % _SPLASH_LANES:
        return f"sequence length {t} is not a multiple of {_SPLASH_LANES}"
    if h != 64 and h % _SPLASH_LANES:
        return f"head dim {h} is neither 64 nor a multiple of {_SPLASH_LANES}"
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float32) or k_BSKH.dtype != q_BTNH.dtype:
        return f"it takes bfloat16 or float32 inputs, not {q_BTNH.dtype}/{k_BSKH.dtype}"
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if q_BTNH.dtype == jnp.bfloat16 and precision in _FLOAT32_PRECISIONS:
        # Mosaic refuses bfloat16 operands at a float32 contract precision.
        return f"jax_default_matmul_precision={precision!r} with bfloat16 inputs"
    return None


def _splash_unplaced() -> str | None:
    """Why splash cannot be placed on the devices (no mesh to shard_map over), or None."""
    if sharding.active_mesh() is None and jax.device_count() > 1:
        return (
            f"no mesh is active and there are {jax.device_count()} devices; trace the step "
            "under sharding.activation_sharding(mesh) so the kernel runs under shard_map"
        )
    return None


def _splash_local(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, *, scale, interpret):
    """Splash over one device's rows and heads (inside `shard_map`, or unsharded)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    _, t, n, _ = q_BTNH.shape
    s = k_BSKH.shape[1]
    mask = sm.MultiHeadMask([sm.CausalMask((t, s)) for _ in range(n)])
    block = next(b for b in _SPLASH_BLOCKS if t % b == 0 and s % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv_compute=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    # Splash has no padding id: give padding its own segment, and zero its queries'
    # outputs afterwards, matching the masked semantics of the reference.
    q_seg = jnp.where(q_segment_BT == 0, -1, q_segment_BT)
    kv_seg = jnp.where(kv_segment_BS == 0, -2, kv_segment_BS)

    def one(q_TNH, k_SKH, v_SKH, qs, ks):
        out_NTH = kernel(
            (q_TNH * scale).transpose(1, 0, 2),
            k_SKH.transpose(1, 0, 2),
            v_SKH.transpose(1, 0, 2),
            segment_ids=sk.SegmentIds(q=qs, kv=ks),
        )
        return out_NTH.transpose(1, 0, 2)

    out = jax.vmap(one)(q_BTNH, k_BSKH, v_BSKH, q_seg, kv_seg)
    return jnp.where((q_segment_BT != 0)[:, :, None, None], out, 0).astype(q_BTNH.dtype)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale, interpret=False):
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly).

    Under `sharding.activation_sharding` on a mesh of more than one device the kernel
    runs inside `shard_map`: rows split over the mesh axes of the logical 'batch' axis,
    query heads over those of 'heads', and the sequence whole on every device. When the
    kv heads are split the same way as the query heads, each device holds the kv heads
    of its own query groups; when they cannot be (fewer kv heads than the head split),
    each kv head is repeated for its G query heads first.
    """
    local = functools.partial(_splash_local, scale=scale, interpret=interpret)
    active = sharding.active_mesh()
    if active is None or active[0].size == 1:
        # One device: nothing to partition (attend checks there is only one).
        return local(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS)
    mesh, rules = active
    q_spec = sharding.logical_to_spec(("batch", None, "heads", None), q_BTNH.shape, mesh, rules)
    kv_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), k_BSKH.shape, mesh, rules)
    if kv_spec[2] != q_spec[2]:
        g = q_BTNH.shape[2] // k_BSKH.shape[2]
        k_BSKH = jnp.repeat(k_BSKH, g, axis=2)
        v_BSKH = jnp.repeat(v_BSKH, g, axis=2)
        kv_spec = q_spec
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS)


def check_implementation(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(
            f"attention implementation {impl!r} is unknown; expected one of {IMPLEMENTATIONS}"
        )


def platform() -> str:
    """The platform steps are being traced for: the active mesh's devices, else the
    default backend ('cpu', 'gpu', 'tpu')."""
    active = sharding.active_mesh()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def resolve_implementation(impl: str, on: str | None = None) -> str:
    """Maps 'auto' to the kernel of platform `on` (default: `platform()`); validates
    the name."""
    check_implementation(impl)
    if impl != "auto":
        return impl
    return {"gpu": "cudnn", "tpu": "splash"}.get(on or platform(), "xla")


_fallbacks_logged: set[tuple[str, str]] = set()


def _cannot_serve(asked: str, kernel: str, why: str) -> None:
    """A kernel cannot serve a call: an error when it was named, else a note (once)."""
    if asked == kernel:
        raise ConfigError(
            f"attention_impl={kernel!r} cannot serve this call: {why}. Use 'auto' (falls "
            "back to 'xla' where the kernel does not fit) or 'xla'."
        )
    if (kernel, why) not in _fallbacks_logged:
        _fallbacks_logged.add((kernel, why))
        logging.warning("attention: %s cannot serve a call (%s); using xla for it", kernel, why)


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    q_segment_BT: jax.Array,
    kv_segment_BS: jax.Array,
    q_offset: jax.Array | int | None = None,
    packed: bool = True,
    impl: str = "xla",
) -> jax.Array:
    """Grouped-query attention (N a multiple of K). Returns q.dtype[B, T, N, H].

    q_offset: slot of the first query in the kv sequence; None means the queries are
    the kv sequence itself (no cache). packed=False promises every segment id is 1
    (no packing, no padding), which lets cuDNN use its causal mode without a mask.
    impl is resolved here, at trace time (see the module docstring).
    """
    scale = q_BTNH.shape[-1] ** -0.5
    kernel = resolve_implementation(impl)
    if q_offset is None:
        if kernel == "cudnn":
            why = _cudnn_unfit(q_BTNH, k_BSKH)
            if why is None:
                return cudnn_attention(
                    q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale, packed
                )
            _cannot_serve(impl, kernel, why)
        elif kernel == "splash":
            why = _splash_unfit(q_BTNH, k_BSKH) or _splash_unplaced()
            if why is None:
                return splash_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale)
            _cannot_serve(impl, kernel, why)
        q_offset = 0
    mask = attention_mask(q_segment_BT, kv_segment_BS, q_offset)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale)
