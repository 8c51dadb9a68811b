"""GPU-only checks: the Pallas int8 kernel compiled for the real GPU (not interpreted)
against its pure-JAX definition. Skipped where JAX sees no GPU, as in the CPU suite;
`make bench-gpu` runs them on a GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.nn.kernels.int8_matmul import int8_matmul, int8_matmul_reference

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason=f"needs a GPU (JAX backend: {jax.default_backend()}); run with JAX_PLATFORMS=cuda",
)


def _operands(m, k, n, dtype):
    r = np.random.RandomState(m * 7 + k)
    x = jnp.asarray(r.randn(m, k), dtype)
    w = jnp.asarray(r.randint(-127, 128, (k, n)), jnp.int8)
    s = jnp.asarray(r.rand(n) * 0.01 + 1e-3, jnp.float32)
    return x, w, s


# Decode batches (1, 16, 128 rows), sizes that are not multiples of the blocks, and the
# llama3.2-1b projections' widths.
@pytest.mark.parametrize(
    "m,k,n", [(1, 2048, 8192), (16, 8192, 2048), (128, 2048, 512), (5, 520, 130), (33, 200, 300)]
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_int8_kernel_on_gpu_matches_reference(m, k, n, dtype):
    x, w, s = _operands(m, k, n, dtype)
    got = int8_matmul(x, w, s)
    want = int8_matmul_reference(x, w, s)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(dtype)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # bf16: a rounding of the output; float32: the GPU's dot may use TF32 inputs.
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * scale)
