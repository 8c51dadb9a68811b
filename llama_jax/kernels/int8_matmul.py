"""A skinny int8 weight-only matmul for decoding: y[M, N] = (x[M, K] @ w[K, N]) * s[N].

For small M (decode batches), the product is bound by reading w. XLA's route (convert
the int8 weight to the compute dtype, then dot) gains nothing over a bf16 weight; this
kernel streams the int8 tiles once, widens them in registers, accumulates in float32
and scales each output column at the end. Written for the Triton backend (GPU); on CPU
it runs in interpret mode (tests). `int8_matmul_reference` is the definition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Triton's dot needs at least 16 rows; decode batches are padded up to this.
_MIN_M = 16


def int8_matmul_reference(x_MK, w_KN, s_N, out_dtype=None):
    """x: dtype[M, K]; w: int8[K, N]; s: float32[N] -> out_dtype (default x's)[M, N]."""
    acc = jnp.dot(x_MK, w_KN.astype(x_MK.dtype), preferred_element_type=jnp.float32)
    return (acc * s_N.astype(jnp.float32)).astype(out_dtype or x_MK.dtype)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, steps: int):
    def body(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :].astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, steps, body, acc)
    o_ref[...] = (acc * s_ref[...][None, :].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "out_dtype", "interpret"))
def int8_matmul(x_MK, w_KN, s_N, *, block_n=128, block_k=256, out_dtype=None, interpret=False):
    """The Pallas version of `int8_matmul_reference`, for any M, K, N (padded to the
    blocks inside). One program per block of `block_n` output columns; each streams its
    [K, block_n] int8 tile in `block_k` slices."""
    m, k = x_MK.shape
    n = w_KN.shape[1]
    out_dtype = jnp.dtype(out_dtype or x_MK.dtype)
    block_k = min(block_k, pl.next_power_of_2(k))
    block_n = min(block_n, pl.next_power_of_2(n))
    mp = max(_MIN_M, pl.next_power_of_2(m))
    kp = pl.cdiv(k, block_k) * block_k
    np_ = pl.cdiv(n, block_n) * block_n
    x = jnp.pad(x_MK, ((0, mp - m), (0, kp - k)))
    w = jnp.pad(w_KN, ((0, kp - k), (0, np_ - n)))
    s = jnp.pad(s_N.astype(jnp.float32), (0, np_ - n))
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=kp // block_k),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(np_ // block_n,),
        in_specs=[
            pl.BlockSpec((mp, kp), lambda j: (0, 0)),
            pl.BlockSpec((kp, block_n), lambda j: (0, j)),
            pl.BlockSpec((block_n,), lambda j: (j,)),
        ],
        out_specs=pl.BlockSpec((mp, block_n), lambda j: (0, j)),
        interpret=interpret,
    )(x, w, s)
    return out[:m, :n]
