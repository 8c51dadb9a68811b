"""Splash attention on a mesh: numerics under shard_map (interpret mode, fake CPU
devices), and ahead-of-time compilation for a real TPU topology with libtpu."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.nn import attention
from llama_jax.tpu import topology

BTNH = ("batch", "length", "heads", "head_dim")
BTKH = ("batch", "length", "kv_heads", "head_dim")


def _qkv(b, t, n, k, h, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, t, n, h), dtype),
        jax.random.normal(keys[1], (b, t, k, h), dtype),
        jax.random.normal(keys[2], (b, t, k, h), dtype),
    )


def _reference(q, k, v, seg):
    ref = attention.xla_attention(q, k, v, attention.attention_mask(seg, seg), q.shape[-1] ** -0.5)
    return jnp.where((seg != 0)[:, :, None, None], ref, 0)


@pytest.mark.parametrize(
    "mesh_axes,n,k",
    [
        (dict(data=2, fsdp=2, tensor=2), 4, 2),  # kv heads split with their query groups
        (dict(data=1, fsdp=2, tensor=4), 4, 2),  # fewer kv heads than the head split
    ],
)
def test_splash_under_shard_map_matches_reference(mesh_axes, n, k):
    mesh = sharding.create_mesh(**mesh_axes)
    rules = sharding.DEFAULT_RULES
    q, kk, v = _qkv(4, 128, n, k, 64)
    seg = jnp.asarray([[1] * 50 + [2] * 78, [1] * 128, [1] * 120 + [0] * 8, [3] * 128])

    def put(x, names):
        return jax.device_put(
            x, NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh))
        )

    def run(q, kk, v, seg):
        with sharding.activation_sharding(mesh, rules):
            scale = q.shape[-1] ** -0.5
            return attention.splash_attention(q, kk, v, seg, seg, scale, interpret=True)

    args = (put(q, BTNH), put(kk, BTKH), put(v, BTKH), put(seg, ("batch", "length")))
    out = jax.jit(run)(*args)
    np.testing.assert_allclose(out, _reference(q, kk, v, seg), atol=2e-5, rtol=0)


def test_named_kernel_that_cannot_serve_raises_and_auto_falls_back(monkeypatch):
    q, k, v = _qkv(1, 100, 2, 1, 64)
    seg = jnp.ones((1, 100), jnp.int32)
    with pytest.raises(ConfigError, match="sequence length 100 is not a multiple"):
        attention.attend(q, k, v, q_segment_BT=seg, kv_segment_BS=seg, impl="splash")
    q, k, v = _qkv(1, 128, 2, 1, 96)
    seg = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ConfigError, match="head dim 96"):
        attention.attend(q, k, v, q_segment_BT=seg, kv_segment_BS=seg, impl="splash")
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        attention.attend(q, k, v, q_segment_BT=seg, kv_segment_BS=seg, impl="cudnn")
    q, k, v = _qkv(1, 128, 2, 1, 64, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        with pytest.raises(ConfigError, match="'highest' with bfloat16"):
            attention.attend(q, k, v, q_segment_BT=seg, kv_segment_BS=seg, impl="splash")
    # 'auto' resolved for a TPU falls back to the reference for the same call.
    monkeypatch.setattr(attention, "platform", lambda: "tpu")
    out = attention.attend(q, k, v, q_segment_BT=seg, kv_segment_BS=seg, impl="auto")
    np.testing.assert_allclose(out, _reference(q, k, v, seg), atol=1e-6)


def test_auto_resolves_by_the_active_mesh_platform():
    assert attention.resolve_implementation("auto", "tpu") == "splash"
    assert attention.resolve_implementation("auto", "gpu") == "cudnn"
    mesh = sharding.create_mesh()
    with sharding.activation_sharding(mesh):
        assert attention.platform() == "cpu"
        assert attention.resolve_implementation("auto") == "xla"


def _tpu_devices():
    pytest.importorskip("libtpu", reason="libtpu is not installed (make test installs it)")
    try:
        return topology.tpu_target("v5p:2x2x1").devices
    except ConfigError as e:
        pytest.skip(f"the TPU compiler is unavailable here: {e}")


def _compiled_train_step_text(devices, config, mesh_axes, seq_len, impl):
    """Forward and backward of a small model on the TPU mesh, compiled ahead of time."""
    from flax import nnx

    from llama_jax.nn.model import Llama

    mesh = sharding.create_mesh(devices=devices, **mesh_axes)
    rules = sharding.DEFAULT_RULES

    def make():
        return Llama(
            config,
            dtype=jnp.bfloat16,
            attention_impl=impl,
            remat_policy="dots_no_batch",
            rngs=nnx.Rngs(0),
        )

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shard = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
    params = jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
        nnx.to_pure_dict(abstract),
        shard,
    )
    tokens = jax.ShapeDtypeStruct(
        (8, seq_len),
        jnp.int32,
        sharding=NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "length"), (8, seq_len), mesh)
        ),
    )

    def loss(p, tokens):
        with sharding.activation_sharding(mesh, rules):
            model = nnx.merge(graphdef, p)
            logits = model(tokens, segment_ids_BT=jnp.ones_like(tokens))
        return logits.astype(jnp.float32).mean()

    step = jax.jit(jax.grad(loss), out_shardings=jax.tree.map(lambda x: x.sharding, params))
    # conftest asks for float32 matmuls (CPU parity); bfloat16 TPU kernels run at default.
    with jax.default_matmul_precision("default"), topology.uncached_compiles():
        return step.lower(params, tokens).compile().as_text()


@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 8, 2), (128, 4, 2)])
def test_splash_compiles_for_a_tpu_mesh(head_dim, num_heads, num_kv_heads):
    devices = _tpu_devices()
    config = LlamaConfig(
        vocab_size=512,
        embed_dim=256,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_dim=512,
        max_position_embeddings=1024,
    )
    text = _compiled_train_step_text(devices, config, dict(fsdp=2, tensor=2), 256, "auto")
    assert "tpu_custom_call" in text
    # A length the kernel does not take: 'auto' compiles the reference instead.
    text = _compiled_train_step_text(devices, config, dict(fsdp=2, tensor=2), 200, "auto")
    assert "tpu_custom_call" not in text


@pytest.mark.parametrize("head_dim,num_heads", [(64, 8), (128, 4)])
def test_decode_step_compiles_for_a_tpu_mesh_with_splash_in_the_prefill(head_dim, num_heads):
    from flax import nnx

    from llama_jax.nn import generation as gen
    from llama_jax.nn.model import Llama

    devices = _tpu_devices()
    mesh = sharding.create_mesh(devices=devices, fsdp=2, tensor=2)
    config = LlamaConfig(
        vocab_size=512,
        embed_dim=256,
        num_layers=2,
        num_heads=num_heads,
        num_kv_heads=2,
        head_dim=head_dim,
        mlp_dim=512,
        max_position_embeddings=1024,
    )

    def make():
        return Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh), abstract, shardings
    )
    rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), (4, 256), mesh))
    prompt = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
    with (
        sharding.activation_sharding(mesh),
        jax.default_matmul_precision("default"),
        topology.uncached_compiles(),
    ):
        text = (
            gen._generate_jit.lower(
                graphdef,
                state,
                prompt,
                prompt,
                prompt,
                jax.random.key(0),
                max_new_tokens=16,
                sampling=gen.Sampling(),
                eos_ids=(2,),
                pad_id=0,
            )
            .compile()
            .as_text()
        )
    assert "tpu_custom_call" in text
