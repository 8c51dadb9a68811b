"""Attention kernels behind one interface, and the KV cache.

`attend(q_BTNH, k_BSKH, v_BSKH, ...)` masks by
  * causality over slot indices: query t (at slot `q_offset + t`) sees kv slots <= its own;
  * segments: a query sees only kv slots with its segment id; id 0 is padding, seen by
    nobody (a padding query's output is finite and meaningless).

Implementations:
  * 'xla'    plain einsums, softmax in float32: CPU, the reference, and any shape.
  * 'cudnn'  cuDNN flash attention via `jax.nn.dot_product_attention` (GPU, bf16/fp16).
  * 'splash' Pallas splash attention (TPU).
  * 'auto'   cudnn on GPU and splash on TPU where the call fits them, else xla.
A call that a fast kernel cannot express (a KV cache offset, unsupported dtype or
head dim, lengths not a multiple of the splash block) runs on 'xla'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@struct.dataclass
class KVCache:
    """Keys and values of all layers for decoding.

    k, v: dtype[L, B, S, K, H] (rotary embedding already applied to k);
    segment_ids: int32[B, S], 0 for empty or padding slots;
    end: int32[] number of slots written (the next write position).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    end: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, max_len, num_kv_heads, head_dim, dtype) -> KVCache:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            end=jnp.zeros((), jnp.int32),
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


def _cudnn_fits(q_BTNH, k_BSKH) -> bool:
    return (
        q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
        and k_BSKH.dtype == q_BTNH.dtype
        and q_BTNH.shape[-1] <= 256
        and q_BTNH.shape[-1] % 8 == 0
    )


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


_SPLASH_BLOCK = 128


def splash_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale, interpret=False):
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    _, t, n, _ = q_BTNH.shape
    s = k_BSKH.shape[1]
    mask = sm.MultiHeadMask([sm.CausalMask((t, s)) for _ in range(n)])
    block = min(_SPLASH_BLOCK, t, s)
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


def _splash_fits(q_BTNH, k_BSKH) -> bool:
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    return t == s and t % _SPLASH_BLOCK == 0 and q_BTNH.shape[-1] % 128 == 0


def resolve_implementation(impl: str) -> str:
    """Maps 'auto' to the platform's kernel; validates the name."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {impl!r} is unknown; expected {IMPLEMENTATIONS}"
        )
    if impl != "auto":
        return impl
    return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")


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
    """
    scale = q_BTNH.shape[-1] ** -0.5
    impl = resolve_implementation(impl)
    if q_offset is None:
        if impl == "cudnn" and _cudnn_fits(q_BTNH, k_BSKH):
            return cudnn_attention(
                q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale, packed
            )
        if impl == "splash" and _splash_fits(q_BTNH, k_BSKH):
            return splash_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, scale)
        q_offset = 0
    mask = attention_mask(q_segment_BT, kv_segment_BS, q_offset)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale)
