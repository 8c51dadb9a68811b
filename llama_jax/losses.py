"""Losses computed in float32 over chunks of tokens from the final hidden states.

The unembedding runs one chunk of positions at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds the full float32 `[B, T, V]`
logits: the loss memory is one chunk's `[B, C, V]`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax import sharding


def _chunks(x, chunk: int):
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T padded up to a multiple of chunk)."""
    b, t = x.shape[:2]
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def chunked_cross_entropy(
    h_BTD: jax.Array,
    unembed: Callable[[jax.Array], jax.Array],
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of tokens it covers.

    h: dtype[B, T, D] final hidden states; unembed: [B, C, D] -> [B, C, V] logits;
    targets: int[B, T]; mask: [B, T], non-zero where a token counts.
    Returns (float32[] sum of -log p(target), float32[] count). Divide for the mean.
    """
    if chunk < 1:
        raise ValueError(f"loss chunk={chunk} must be >= 1")
    chunk = min(chunk, h_BTD.shape[1])

    @jax.checkpoint
    def one(h_BCD, targets_BC, mask_BC):
        logits = unembed(h_BCD).astype(jnp.float32)
        logits = sharding.constrain(logits, ("batch", "length", "vocab"))
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - target_logit) * mask_BC)

    def body(total, xs):
        return total + one(*xs), None

    mask = mask_BT.astype(jnp.float32)
    xs = (_chunks(h_BTD, chunk), _chunks(targets_BT, chunk), _chunks(mask, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask)
