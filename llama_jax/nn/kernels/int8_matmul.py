"""A skinny int8 weight-only matmul for decoding: y[M, N] = (x[M, K] @ w[K, N]) * s[N].

For small M (decode batches), the product is bound by reading w. XLA's route (convert
the int8 weight to the compute dtype, then dot) gains nothing over a bf16 weight; this
kernel streams the int8 tiles once, widens them in registers, accumulates in float32,
and the column scales are applied once at the end. `int8_matmul_reference` is the
definition.

Backend. The kernel is written for Triton and names that backend in its compiler
parameters: since JAX 0.10 an unnamed `pallas_call` on GPU lowers through Mosaic GPU,
which stages whole blocks in shared memory and cannot hold a [M, K] x block and a
[K, block_n] weight block at LLaMA sizes. Under Triton a block is a window of global
memory, and the kernel loads [M, block_k] and [block_k, block_n] slices of it per step
(software-pipelined by Triton), so shared memory grows with the tile, not with K. On
the CPU the kernel runs in interpret mode (tests).

Grid. A decode product has few output columns per GPU core: one program per 128
columns is 16 programs for N=2048 on a GPU with 132 SMs, which leaves most of them, and
most of the memory bandwidth, idle. `tiling` picks the grid from the shapes:

  1. block_n, the columns per program: the largest of 128, 64, 32 that gives at least
     TARGET_PROGRAMS column blocks (else 32; narrower rows of int8 stop filling 32-byte
     memory sectors).
  2. splits, a second grid axis over K (split-K): doubled while the grid is still short
     of TARGET_PROGRAMS and each slice keeps at least MIN_K_SPLIT rows of K. Each
     program writes an unscaled float32 partial [M, block_n] into a [splits, M, N]
     buffer; the sum over splits and the scale are one fused XLA op afterwards (the
     buffer is a few hundred KB: it stays in L2).
  3. block_k, the K rows loaded per loop step: the largest of 256, 128, 64, 32 that
     pads each K slice by at most an eighth and keeps the estimated shared memory of
     Triton's pipelined loads within SMEM_BUDGET, so that two programs fit on one SM.

TARGET_PROGRAMS = 256 is about two programs per SM of a 132-SM H100/H200: each SM then
has a second program whose loads are in flight while the first computes. At the
LLaMA 3 projection shapes (K and N multiples of 512) this gives 256 programs (448 at
N=14336) and no padding. Rows are padded to a power of two from 16 (Triton's smallest
dot) to 64; larger M is cut into blocks of 64 rows, a third grid axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Triton's dot needs at least 16 rows; decode batches are padded up to this. Larger
# products are cut into blocks of at most _MAX_M rows (a third grid axis).
_MIN_M = 16
_MAX_M = 64
TARGET_PROGRAMS = 256
MIN_K_SPLIT = 128
SMEM_BUDGET = 96 * 1024
_BLOCK_N = (128, 64, 32)
_BLOCK_K = (256, 128, 64, 32)
# Triton's default pipeline depth on CUDA (loads of this many steps in flight).
_NUM_STAGES = 3


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How `int8_matmul` cuts a product: x is padded to [m_blocks * block_m,
    splits * k_split] and w to [splits * k_split, n_blocks * block_n]; program (j, s, i)
    computes rows [i * block_m, (i + 1) * block_m) of columns [j * block_n, (j + 1) *
    block_n) over K rows [s * k_split, (s + 1) * k_split), in steps of block_k."""

    block_m: int
    block_n: int
    block_k: int
    k_split: int
    n_blocks: int
    splits: int
    m_blocks: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.n_blocks, self.splits, self.m_blocks)

    @property
    def programs(self) -> int:
        return self.n_blocks * self.splits * self.m_blocks


def _smem_bytes(block_m: int, block_k: int, block_n: int, itemsize: int) -> int:
    """Shared memory of one program, estimated: the pipelined x and w slices, plus the
    widened w slice that the dot reads."""
    loads = block_m * block_k * itemsize + block_k * block_n
    return _NUM_STAGES * loads + block_k * block_n * itemsize


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value}; expected a power of two >= 16 (Triton's tiles)")


def tiling(
    m: int,
    k: int,
    n: int,
    itemsize: int = 2,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> Tiling:
    """The tiling `int8_matmul` uses for x[m, k] (itemsize bytes per element) and
    w[k, n]: the heuristic in the module docstring, with any of block_n, block_k and
    splits given explicitly instead."""
    block_m = min(_MAX_M, max(_MIN_M, pl.next_power_of_2(m)))
    m_blocks = pl.cdiv(m, block_m)
    if block_n is None:
        block_n = next((b for b in _BLOCK_N if pl.cdiv(n, b) >= TARGET_PROGRAMS), _BLOCK_N[-1])
        block_n = min(block_n, max(16, pl.next_power_of_2(n)))
    _check_block("block_n", block_n)
    n_blocks = pl.cdiv(n, block_n)
    if splits is None:
        splits = 1
        while m_blocks * n_blocks * splits < TARGET_PROGRAMS and 2 * splits * MIN_K_SPLIT <= k:
            splits *= 2
    if splits < 1:
        raise ValueError(f"splits={splits}; expected at least 1")
    per_split = pl.cdiv(k, splits)
    if block_k is None:
        block_k = next(
            (
                b
                for b in _BLOCK_K
                if pl.cdiv(per_split, b) * b - per_split <= per_split // 8
                and _smem_bytes(block_m, b, block_n, itemsize) <= SMEM_BUDGET
            ),
            _BLOCK_K[-1],
        )
    _check_block("block_k", block_k)
    k_split = pl.cdiv(per_split, block_k) * block_k
    return Tiling(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        k_split=k_split,
        n_blocks=n_blocks,
        splits=pl.cdiv(k, k_split),
        m_blocks=m_blocks,
    )


def int8_matmul_reference(x_MK, w_KN, s_N, out_dtype=None):
    """x: dtype[M, K]; w: int8[K, N]; s: float32[N] -> out_dtype (default x's)[M, N]."""
    acc = jnp.dot(x_MK, w_KN.astype(x_MK.dtype), preferred_element_type=jnp.float32)
    return (acc * s_N.astype(jnp.float32)).astype(out_dtype or x_MK.dtype)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    def body(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :].astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


@functools.partial(
    jax.jit, static_argnames=("block_n", "block_k", "splits", "out_dtype", "interpret")
)
def int8_matmul(
    x_MK,
    w_KN,
    s_N,
    *,
    block_n=None,
    block_k=None,
    splits=None,
    out_dtype=None,
    interpret=False,
):
    """The Pallas version of `int8_matmul_reference`, for any M, K, N (padded to the
    tiling inside; no padding at K and N multiples of 512). block_n, block_k, splits:
    override `tiling`'s choice. x: dtype[M, K]; w: int8[K, N]; s: float32[N] ->
    out_dtype (default x's)[M, N]."""
    m, k = x_MK.shape
    n = w_KN.shape[1]
    out_dtype = jnp.dtype(out_dtype or x_MK.dtype)
    t = tiling(
        m,
        k,
        n,
        jnp.dtype(x_MK.dtype).itemsize,
        block_n=block_n,
        block_k=block_k,
        splits=splits,
    )
    mp, kp, np_ = t.m_blocks * t.block_m, t.splits * t.k_split, t.n_blocks * t.block_n
    x = jnp.pad(x_MK, ((0, mp - m), (0, kp - k)))
    w = jnp.pad(w_KN, ((0, kp - k), (0, np_ - n)))
    partial_sums = pl.pallas_call(
        functools.partial(_kernel, block_k=t.block_k, steps=t.k_split // t.block_k),
        out_shape=jax.ShapeDtypeStruct((t.splits, mp, np_), jnp.float32),
        grid=t.grid,
        in_specs=[
            pl.BlockSpec((t.block_m, t.k_split), lambda j, s, i: (i, s)),
            pl.BlockSpec((t.k_split, t.block_n), lambda j, s, i: (s, j)),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, t.block_m, t.block_n), lambda j, s, i: (s, i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=_NUM_STAGES),
        interpret=interpret,
        name="int8_matmul",
    )(x, w)
    acc = jnp.sum(partial_sums[:, :m, :n], axis=0)
    return (acc * s_N.astype(jnp.float32)).astype(out_dtype)
