"""Int8 weight-only quantization: numerics, the model, checkpoints and the kernel."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_hf_model

from llama_jax import sharding, tree
from llama_jax.compress import quant
from llama_jax.config import get_preset
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats import ModelDir, model_dir, transforms
from llama_jax.nn import generation as gen
from llama_jax.nn.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from llama_jax.nn.model import Llama

REPO = Path(__file__).parents[1]
TOKENIZER = REPO / "configs" / "data" / "tokenizer.json"


def test_quantize_error_is_within_half_a_step_per_channel():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 37, 5, 11)) * jnp.arange(1, 56).reshape(5, 11)
    w = w.at[1, :, 2, 3].set(0.0)  # an all-zero output channel
    q, s = quant.quantize(w, num_in=1)
    assert q.dtype == jnp.int8 and s.shape == (3, 5, 11) and s.dtype == jnp.float32
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    err = jnp.abs(quant.dequantize(q, s, num_in=1) - w)
    assert bool(jnp.all(err <= 0.5 * s[:, None] + 1e-6))
    assert float(s[1, 2, 3]) == 1.0 and bool(jnp.all(q[1, :, 2, 3] == 0))
    # Two input axes (o_proj: [L, N, H, D]).
    q2, s2 = quant.quantize(w, num_in=2)
    assert s2.shape == (3, 11)
    assert bool(jnp.all(jnp.abs(quant.dequantize(q2, s2, 2) - w) <= 0.5 * s2[:, None, None] + 1e-6))


def _float_and_quantized(config, embed=False):
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    q_params = quant.quantize_params(nnx.to_pure_dict(state), embed=embed)
    q_model = nnx.eval_shape(
        lambda: Llama(
            config,
            quantized=True,
            quantize_embed=embed,
            dot_general=quant.int8_dot_general,
            rngs=nnx.Rngs(0),
        )
    )
    q_graphdef, q_state = nnx.split(q_model)
    nnx.replace_by_pure_dict(q_state, q_params)
    return model, nnx.merge(q_graphdef, q_state), q_params


@pytest.mark.parametrize("embed", [False, True])
def test_quantized_model_has_the_float_tree_and_close_logits(embed):
    config = dataclasses.replace(get_preset("tiny"), tie_word_embeddings=embed)
    model, q_model, q_params = _float_and_quantized(config, embed=embed)
    float_paths = set(tree.flatten(nnx.to_pure_dict(nnx.split(model)[1])))
    q_flat = tree.flatten(q_params)
    assert float_paths <= set(q_flat)
    targets = quant.quantized_paths(embed=embed)
    assert set(q_flat) - float_paths == {k + "_scale" for k in targets}
    for k in targets:
        assert q_flat[k].dtype == jnp.int8
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 23)))
    ref, out = model(tokens), q_model(tokens)
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 0.05, rel
    with pytest.raises(ConfigError, match="already quantized"):
        quant.quantize_params(q_params)
    with pytest.raises(ValueError, match="int8_dot_general"):
        Llama(config, quantized=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("m,k,n", [(1, 200, 300), (5, 64, 77), (16, 128, 256), (33, 520, 130)])
def test_kernel_equals_reference_in_interpret_mode(m, k, n):
    r = np.random.RandomState(m)
    x = jnp.asarray(r.randn(m, k), jnp.float32)
    w = jnp.asarray(r.randint(-127, 128, (k, n)), jnp.int8)
    s = jnp.asarray(r.rand(n) * 0.01 + 1e-3, jnp.float32)
    got = int8_matmul(x, w, s, block_n=64, block_k=64, interpret=True)
    want = int8_matmul_reference(x, w, s)
    assert got.shape == (m, n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    bf = int8_matmul(x.astype(jnp.bfloat16), w, s, interpret=True)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(bf, np.float32),
        np.asarray(int8_matmul_reference(x.astype(jnp.bfloat16), w, s), np.float32),
        rtol=2e-2,
        atol=2e-2,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "hf"
    make_hf_model(d, vocab_size=263, num_key_value_heads=1, attention_bias=True)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, hf_dir):
    """A float conversion, its offline quantization, and a quantized conversion."""
    root = tmp_path_factory.mktemp("qdirs")
    mesh = sharding.create_mesh(fsdp=2, tensor=4)
    transforms.convert_hf(hf_dir, root / "float", mesh=mesh)
    both = dict(quantize_head=True, quantize_embed=True)
    transforms.quantize_dir(root / "float", root / "offline", mesh=mesh, **both)
    transforms.convert_hf(hf_dir, root / "onthefly", mesh=mesh, quantize="int8", **both)
    return root


def test_offline_and_on_the_fly_quantization_agree_and_round_trip(dirs):
    for d in ("offline", "onthefly"):
        meta = json.loads((dirs / d / "metadata.json").read_text())
        assert meta["quantization"] == "int8"
        assert meta["quantized_head"] and meta["quantized_embed"]
    a = dict(ModelDir.open(dirs / "offline").iter_host_params())
    b = dict(ModelDir.open(dirs / "onthefly").iter_host_params())
    assert a.keys() == b.keys() and "layers.mlp.up_proj.kernel_scale" in a
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("layers.attn.q_proj.kernel", "lm_head.kernel", "embed.embedding"):
        assert a[name].dtype == np.int8, name
    assert a["embed.embedding_scale"].shape == (263,) and a["lm_head.kernel_scale"].shape == (263,)

    # Parameter bytes: int8 is a quarter of float32 (norms, biases and scales stay).
    size = lambda d: json.loads((dirs / d / "metadata.json").read_text())["params_bytes"]
    assert size("offline") < 0.3 * size("float")

    # Sharded on 8 devices equals one device; close to the float model.
    tokens = np.random.RandomState(1).randint(0, 263, (2, 19))
    one, _ = model_dir.load_model(dirs / "offline")
    eight, _ = model_dir.load_model(dirs / "offline", mesh=sharding.create_mesh(fsdp=4, tensor=2))
    ref, _ = model_dir.load_model(dirs / "float")
    np.testing.assert_allclose(np.asarray(eight(tokens)), np.asarray(one(tokens)), atol=1e-5)
    err = np.abs(np.asarray(one(tokens)) - np.asarray(ref(tokens))).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(ref(tokens))).max()

    # Greedy generation from the int8 checkpoint.
    outs = gen.generate(one, [[1, 5, 9], [1, 7]], max_new_tokens=6, eos_ids=[])
    assert [len(o) for o in outs] == [6, 6]


def test_bad_quantization_requests_are_refused(tmp_path, dirs, hf_dir):
    mesh = sharding.create_mesh(fsdp=8)
    with pytest.raises(CheckpointError, match="already quantized"):
        transforms.quantize_dir(dirs / "onthefly", tmp_path / "qq", mesh=mesh)
    with pytest.raises(ConfigError, match="mode='int4'"):
        transforms.quantize_dir(hf_dir, tmp_path / "q4", mode="int4", mesh=mesh)
    with pytest.raises(ConfigError, match="mode='int3'"):
        transforms.convert_hf(hf_dir, tmp_path / "q3", mesh=mesh, quantize="int3")
    tied = dataclasses.replace(ModelDir.open(hf_dir).config, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="ties its LM head"):
        transforms.quant_options(tied, "int8", True, False)
    with pytest.raises(CheckpointError, match="is quantized"):
        transforms.export_hf(dirs / "onthefly", tmp_path / "back")
    for d in ("qq", "q4", "q3", "back"):
        assert not (tmp_path / d).exists()


def test_quantize_cli_writes_a_directory_generate_reads(tmp_path, hf_dir):
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.quantize", f"--model_dir={hf_dir}", f"--out_dir={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ModelDir.open(out).quantization == "int8"
    meta = json.loads((out / "metadata.json").read_text())
    assert not meta["quantized_head"] and not meta["quantized_embed"]
    model, _ = model_dir.load_model(out)
    tokenizer = model_dir.load_tokenizer(out)
    outs = gen.generate(model, tokenizer.encode_batch(["the cat"]), max_new_tokens=4, eos_ids=[])
    assert len(outs[0]) == 4
