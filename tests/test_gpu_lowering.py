"""The GPU int8 kernel from the CPU: split-K numerics in interpret mode, lowering for
`cuda` at LLaMA projection shapes (the Triton custom call, a grid that fills the GPU),
and where it runs on a mesh (under shard_map, or XLA where the weights are split)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax.compress import quant
from llama_jax.errors import ConfigError
from llama_jax.nn.kernels.int8_matmul import int8_matmul, int8_matmul_reference, tiling

# The custom call a Triton pallas_call lowers to: XLA's Triton op up to jaxlib 0.10.2,
# a precompiled kernel call after it.
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
# Streaming multiprocessors of an H100 / H200.
GPU_SMS = 132
DIMS = (((2,), (0,)), ((), ()))


def _operands(m, k, n, seed=0, dtype=jnp.float32):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(m, k), dtype)
    w = jnp.asarray(r.randint(-127, 128, (k, n)), jnp.int8)
    s = jnp.asarray(r.rand(n) * 0.01 + 1e-3, jnp.float32)
    return x, w, s


@pytest.mark.parametrize(
    "m,k,n,overrides",
    [
        (1, 300, 50, {}),
        (3, 520, 70, {}),
        (16, 1000, 20, {}),
        (70, 300, 40, {}),  # two blocks of rows
        (5, 200, 33, dict(block_n=16, block_k=32, splits=3)),
    ],
)
def test_split_k_kernel_equals_reference_in_interpret_mode(m, k, n, overrides):
    t = tiling(m, k, n, 4, **overrides)
    # Awkward shapes: K split over several programs and padded, N padded.
    assert t.splits > 1 and t.splits * t.k_split > k and t.n_blocks * t.block_n > n, t
    x, w, s = _operands(m, k, n, seed=m)
    got = int8_matmul(x, w, s, interpret=True, **overrides)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    want = int8_matmul_reference(x, w, s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_tiling_fills_the_gpu_within_shared_memory_and_refuses_bad_blocks():
    for k in (2048, 4096, 8192, 14336):
        for n in (512, 1024, 2048, 4096, 8192, 14336):
            for m in (1, 16, 64):
                t = tiling(m, k, n)
                assert t.programs >= GPU_SMS, (m, k, n, t)
                # No padding of K or N at these shapes (padding copies the weight).
                assert t.splits * t.k_split == k and t.n_blocks * t.block_n == n, t
    # Prefill-sized products are cut into blocks of rows, not loaded whole.
    t = tiling(2048, 8192, 8192)
    assert (t.block_m, t.m_blocks, t.splits) == (64, 32, 1)
    with pytest.raises(ValueError, match="block_k=48"):
        tiling(1, 256, 256, block_k=48)


def _lower_for_cuda(f, *shapes_dtypes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_dtypes]
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _triton_grids(text):
    assert any(t in text for t in TRITON_TARGETS), "no Triton kernel call in the lowered module"
    assert "mosaic_gpu" not in text
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32", text)
    return [tuple(map(int, g)) for g in grids]


# [M, K] x [K, N] projections of LLaMA 3.2 1B (D=2048, F=8192, N*H=2048, K*H=512) and
# LLaMA 3 8B (D=4096, F=14336, N*H=4096, K*H=1024).
LLAMA_SHAPES = [
    (2048, 2048),
    (2048, 512),
    (2048, 8192),
    (8192, 2048),
    (4096, 4096),
    (4096, 1024),
    (4096, 14336),
    (14336, 4096),
]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,n", LLAMA_SHAPES)
def test_kernel_lowers_to_triton_for_cuda_with_a_full_grid(m, k, n):
    text = _lower_for_cuda(
        int8_matmul, ((m, k), jnp.bfloat16), ((k, n), jnp.int8), ((n,), jnp.float32)
    )
    t = tiling(m, k, n)
    grids = _triton_grids(text)
    if TRITON_TARGETS[0] in text:
        assert grids == [t.grid]
    assert t.programs >= GPU_SMS


def test_int8_dot_general_lowers_the_kernel_for_cuda():
    def o_proj(x, w, s):
        dims = (((2, 3), (0, 1)), ((), ()))
        return quant.int8_dot_general(x, w, dims, scale=s, use_kernel=True)

    text = _lower_for_cuda(
        o_proj, ((1, 1, 32, 64), jnp.bfloat16), ((32, 64, 2048), jnp.int8), ((2048,), jnp.float32)
    )
    _triton_grids(text)
    assert "tensor<1x1x2048xbf16>" in text


def _route(x, w, **kwargs):
    """kernel_route as int8_dot_general sees it: while tracing, on abstract values."""
    routes = []
    jax.jit(lambda x, w: routes.append(quant.kernel_route(x, w, **kwargs))).trace(x, w)
    return routes[0]


def test_kernel_route_on_one_device():
    x, w = jnp.zeros((4, 16, 8)), jnp.zeros((8, 24), jnp.int8)
    assert _route(x, w, platform="gpu") == "kernel"
    assert _route(x, w, platform="cpu") == "xla"
    assert _route(jnp.zeros((5, 16, 8)), w, platform="gpu") == "xla"  # 80 rows: not decode
    assert _route(x, w, use_kernel=True) == "kernel"
    assert _route(x, w, platform="gpu", use_kernel=False) == "xla"


def test_kernel_runs_under_shard_map_on_a_data_parallel_mesh():
    mesh = sharding.create_mesh(data=8, fsdp=1)
    x, w, s = _operands(24, 40, 24, seed=3)
    x = x.reshape(8, 3, 40)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))

    def f(x, w, s):
        return quant.int8_dot_general(x, w, DIMS, scale=s, use_kernel=True, interpret=True)

    with sharding.activation_sharding(mesh):
        assert _route(xs, w, platform="gpu") == "shard_map"
        # 128 rows in all, 16 per device: decode-sized.
        assert _route(jnp.zeros((128, 1, 40)), w, platform="gpu") == "shard_map"
        lowered = jax.jit(f).lower(xs, w, s)
        out = jax.jit(f)(xs, w, s)
        cuda = _lower_for_cuda(
            lambda x, w, s: quant.int8_dot_general(x, w, DIMS, scale=s, use_kernel=True),
            ((16, 1, 2048), jnp.bfloat16),
            ((2048, 512), jnp.int8),
            ((512,), jnp.float32),
        )
    want = int8_matmul_reference(x.reshape(24, 40), w, s).reshape(8, 3, 24)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert out.sharding.spec == PartitionSpec("data")
    assert "sdy.manual_computation" in lowered.as_text()
    assert "all-gather" not in lowered.compile().as_text()
    # For cuda: the Triton call inside shard_map, on each device's 2 of the 16 rows.
    assert "sdy.manual_computation" in cuda and "tensor<2x1x2048xbf16>" in cuda
    _triton_grids(cuda)


def test_split_weights_take_the_xla_path_without_gathering_them():
    mesh = sharding.create_mesh(fsdp=1, tensor=8)
    x, w_up, s_up = _operands(6, 40, 48, seed=4)
    _, w_down, s_down = _operands(1, 48, 40, seed=5)
    x = x.reshape(2, 3, 40)

    def put(a, names):
        return jax.device_put(
            a, NamedSharding(mesh, sharding.logical_to_spec(names, a.shape, mesh))
        )

    up, up_s = put(w_up, ("embed", "mlp")), put(s_up, ("mlp",))
    down, down_s = put(w_down, ("mlp", "embed")), put(s_down, ("embed",))

    def mlp(x, up, up_s, down, down_s):
        h = quant.int8_dot_general(x, up, DIMS, scale=up_s)
        return quant.int8_dot_general(h, down, DIMS, scale=down_s)

    with sharding.activation_sharding(mesh):
        assert _route(x, up, platform="gpu") == "xla"
        with pytest.raises(ConfigError, match="split the weights"):
            _route(x, up, use_kernel=True)
        lowered = jax.jit(mlp).lower(x, up, up_s, down, down_s)
        out = jax.jit(mlp)(x, up, up_s, down, down_s)
    h = int8_matmul_reference(x.reshape(6, 40), w_up, s_up)
    want = int8_matmul_reference(h, w_down, s_down).reshape(2, 3, 40)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-4)
    hlo = lowered.compile().as_text()
    # Column-split up, row-split down: local products and one all-reduce.
    assert "all-gather" not in hlo and "all-reduce" in hlo

    # Weights on a multi-device mesh, traced outside activation_sharding: XLA too.
    assert _route(x, up, platform="gpu") == "xla"
    with pytest.raises(ConfigError, match="outside activation_sharding"):
        _route(x, up, use_kernel=True)
