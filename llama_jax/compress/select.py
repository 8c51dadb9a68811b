"""Exact selection of the smallest magnitudes, on sharded arrays, for magnitude pruning.

The k-th smallest magnitude is found by bisection over the float32 bit patterns
(magnitudes are non-negative, so their bits order like their values): each probe is a
count over the sharded arrays, a reduction the devices do where the data lives, and no
array is ever sorted or gathered. Ties at the threshold are broken by position (layer,
then row-major index), found by a second bisection. Arrays are stacked per layer,
[L, ...]; every function here is traced (call it under jit).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _bits(w: jax.Array) -> jax.Array:
    """int32 bit patterns of |w| in float32: non-negative, ordered like the values."""
    return jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)


def slice_sum(x: jax.Array) -> jax.Array:
    """int32[L] count of True per layer slice of a bool[L, ...]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """int32[L, ...] row-major position of every element within its layer slice."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return idx


def _bisect(count_le, lo, hi, steps: int):
    """The smallest v in (lo, hi] with count_le(v) true, count_le being monotone and
    true at hi. lo and hi are matching pytrees of int32 arrays (searched elementwise,
    all in one loop, which compiles faster than one loop each)."""

    def body(_, carry):
        lo, hi = carry
        mid = jax.tree.map(lambda a, b: a + (b - a) // 2, lo, hi)
        ok = count_le(mid)
        lo = jax.tree.map(lambda o, a, m: jnp.where(o, a, m), ok, lo, mid)
        hi = jax.tree.map(lambda o, m, b: jnp.where(o, m, b), ok, mid, hi)
        return lo, hi

    return jax.lax.fori_loop(0, steps, body, (lo, hi))[1]


_INF_BITS = 0x7F800000
_BIT_STEPS = 31  # covers (-1, _INF_BITS]


def _expand(x: jax.Array, ndim: int) -> jax.Array:
    """int32[L] -> int32[L, 1, ...] broadcasting against an [L, ...] array."""
    return x.reshape(x.shape + (1,) * (ndim - 1))


def _first_ties(ties: list[jax.Array], take: list[jax.Array]) -> list[jax.Array]:
    """bool[L, ...] per array: the first take[l] True entries (row-major) of each layer
    slice of each `ties` array, take being int32[L] per array."""
    idx = [_flat_index(t.shape) for t in ties]

    def covers(last_index):
        return [
            slice_sum(t & (i <= _expand(j, t.ndim))) >= n
            for t, i, j, n in zip(ties, idx, last_index, take, strict=True)
        ]

    lo = [jnp.full(n.shape, -1, jnp.int32) for n in take]
    hi = [
        jnp.full(n.shape, math.prod(t.shape[1:]) - 1, jnp.int32)
        for t, n in zip(ties, take, strict=True)
    ]
    steps = max(math.ceil(math.log2(math.prod(t.shape[1:]) + 1)) for t in ties)
    last = _bisect(covers, lo, hi, max(steps, 1))
    return [
        t & (i <= _expand(j, t.ndim)) & _expand(n > 0, t.ndim)
        for t, i, j, n in zip(ties, idx, last, take, strict=True)
    ]


def smallest_per_layer(ws: list[jax.Array], ks: list[jax.Array]) -> list[jax.Array]:
    """bool[L, ...] per array, True where pruned: the k smallest magnitudes of each
    layer slice (ks: int32[] per array)."""
    bits = [_bits(w) for w in ws]
    lo = [jnp.full(w.shape[:1], -1, jnp.int32) for w in ws]
    hi = [jnp.full(w.shape[:1], _INF_BITS, jnp.int32) for w in ws]

    def covers(thresholds):
        return [
            slice_sum(b <= _expand(v, b.ndim)) >= k
            for b, v, k in zip(bits, thresholds, ks, strict=True)
        ]

    thresholds = _bisect(covers, lo, hi, _BIT_STEPS)
    below = [b < _expand(t, b.ndim) for b, t in zip(bits, thresholds, strict=True)]
    need = [k - slice_sum(x) for k, x in zip(ks, below, strict=True)]
    at = [b == _expand(t, b.ndim) for b, t in zip(bits, thresholds, strict=True)]
    ties = _first_ties(at, need)
    return [x | y for x, y in zip(below, ties, strict=True)]


# Counts over all pruned weights can pass 2**31, so the global scope adds them as
# (high, low) int32 pairs: value = high * 2**16 + low, low in [0, 2**16).
def _count_pair(c: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    hi = jnp.sum(c >> 16, axis=axis, dtype=jnp.int32)
    lo = jnp.sum(c & 0xFFFF, axis=axis, dtype=jnp.int32)
    return hi + (lo >> 16), lo & 0xFFFF


def _pair_ge(a, b) -> jax.Array:
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] >= b[1]))


def _pair_sub(a, b) -> tuple[jax.Array, jax.Array]:
    hi, lo = a[0] - b[0], a[1] - b[1]
    borrow = lo < 0
    return hi - borrow.astype(jnp.int32), jnp.where(borrow, lo + (1 << 16), lo)


def _pair_clip(a, upper: jax.Array) -> jax.Array:
    """min(max(a, 0), upper) as int32, upper being int32."""
    hi, lo = a
    small = jnp.minimum(jnp.clip(hi, 0, (1 << 15) - 1) * (1 << 16) + lo, upper)
    return jnp.where(hi < 0, 0, jnp.where(hi >= 1 << 15, upper, small))


def smallest_overall(ws: list[jax.Array], k) -> list[jax.Array]:
    """bool[L, ...] per array, True where pruned: the k smallest magnitudes over all of
    them together (k a (high, low) pair); ties go to the earlier array, layer, index."""
    bits = [_bits(w) for w in ws]

    def count(pred) -> tuple[jax.Array, jax.Array]:
        return _count_pair(jnp.concatenate([slice_sum(pred(b)) for b in bits]))

    t = _bisect(
        lambda v: _pair_ge(count(lambda b: b <= v), k),
        jnp.int32(-1),
        jnp.int32(_INF_BITS),
        _BIT_STEPS,
    )
    need = _pair_sub(k, count(lambda b: b < t))
    ties = jnp.concatenate([slice_sum(b == t) for b in bits])  # int32[S], S = all slices
    # Ties before each slice, as (high, low) pairs: cumulative sums of both halves.
    cum_hi = jnp.cumsum(ties >> 16) - (ties >> 16)
    cum_lo = jnp.cumsum(ties & 0xFFFF) - (ties & 0xFFFF)
    before = (cum_hi + (cum_lo >> 16), cum_lo & 0xFFFF)
    take = _pair_clip(_pair_sub((need[0], need[1]), before), ties)
    bounds = np.cumsum([0] + [b.shape[0] for b in bits])
    take_per_array = [take[bounds[i] : bounds[i + 1]] for i in range(len(bits))]
    chosen = _first_ties([b == t for b in bits], take_per_array)
    return [(b < t) | c for b, c in zip(bits, chosen, strict=True)]


def not_top_n_of_m(w: jax.Array, axis: int, n: int, m: int) -> jax.Array:
    """bool[L, ...] True where pruned: in every M consecutive entries along `axis`, all
    but the N largest magnitudes (ties keep the earlier entry)."""
    mag = jnp.abs(w.astype(jnp.float32))
    shape = mag.shape
    g = mag.reshape(*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])
    pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, axis + 1)
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        other = jax.lax.slice_in_dim(g, j, j + 1, axis=axis + 1)
        beats = (other > g) | ((other == g) & (j < pos))
        rank = rank + beats.astype(jnp.int32)
    return (rank >= n).reshape(shape)
