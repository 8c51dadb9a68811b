"""Model behaviour: KV-cache decoding, scanned vs unrolled layers, packed sequences,
attention kernels against the reference, and parameter metadata."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import get_preset
from llama_jax.nn import attention
from llama_jax.nn.model import REMAT_POLICIES, Llama

CFG = get_preset("tiny")


def _model(**kwargs):
    return Llama(CFG.replace(initializer_range=0.1), rngs=nnx.Rngs(0), **kwargs)


@nnx.jit
def _forward(model, tokens, segment_ids=None):
    return model(tokens, segment_ids_BT=segment_ids)


@nnx.jit
def _cached(model, tokens, cache):
    return model(tokens, cache=cache)


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(3, CFG.vocab_size, (b, t)))


def test_kv_cache_decoding_equals_full_forward():
    model = _model()
    tokens = _tokens(2, 19)
    full = _forward(model, tokens)
    cache = model.init_cache(2, 32)
    prefill, cache = _cached(model, tokens[:, :11], cache)
    steps = [prefill]
    for i in range(11, 19):
        logits, cache = _cached(model, tokens[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)
    assert int(cache.end) == 19


def test_scanned_equals_unrolled_and_remat_changes_nothing():
    tokens = _tokens(2, 13)
    ref = _forward(_model(), tokens)
    for kwargs in [dict(scan_layers=False)] + [dict(remat_policy=p) for p in REMAT_POLICIES]:
        np.testing.assert_allclose(_forward(_model(**kwargs), tokens), ref, atol=1e-5, rtol=0)


def test_gradients_equal_scanned_and_unrolled_with_remat():
    tokens = _tokens(2, 9)

    def loss(model):
        return jnp.mean(model(tokens) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g_scan = grad(_model(remat_policy="full"))
    g_loop = grad(_model(scan_layers=False))
    chex.assert_trees_all_close(g_scan, g_loop, atol=1e-6, rtol=1e-4)


def test_packed_batch_equals_documents_run_separately():
    model = _model()
    docs = [_tokens(1, n, seed=n)[0] for n in (7, 5, 9)]
    packed = jnp.concatenate(docs + [jnp.zeros(3, jnp.int32)])[None]  # 3 padding slots
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [3] * 9 + [0] * 3])
    out = _forward(model, packed, segments)[0]
    start = 0
    for doc in docs:
        alone = _forward(model, doc[None])[0]
        np.testing.assert_allclose(out[start : start + len(doc)], alone, atol=2e-5, rtol=0)
        start += len(doc)
    assert np.isfinite(np.asarray(out)).all()


def test_positions_restart_per_segment():
    from llama_jax.nn.model import segment_positions

    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_every_parameter_has_logical_axis_names():
    _, state = nnx.split(_model())
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim, path
        if path[0] == "layers":
            assert names[0] == "layers"


def test_bf16_compute_with_float32_params_is_close():
    tokens = _tokens(2, 11)
    ref = _forward(_model(), tokens)
    out = _forward(_model(dtype=jnp.bfloat16), tokens)
    assert out.dtype == jnp.bfloat16
    _, state = nnx.split(_model(dtype=jnp.bfloat16))
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(state))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.15, rtol=0.05)


def _qkv(b=2, t=256, n=4, k=2, h=128, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), dtype)
    return q, kk, v


def test_splash_attention_matches_reference_in_interpret_mode():
    q, k, v = _qkv()
    seg = jnp.asarray([[1] * 100 + [2] * 140 + [0] * 16, [1] * 256])
    scale = q.shape[-1] ** -0.5
    ref = attention.xla_attention(q, k, v, attention.attention_mask(seg, seg), scale)
    ref = jnp.where((seg != 0)[:, :, None, None], ref, 0)
    out = attention.splash_attention(q, k, v, seg, seg, scale, interpret=True)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_reference():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    seg = jnp.ones(q.shape[:2], jnp.int32)
    scale = q.shape[-1] ** -0.5
    ref = attention.xla_attention(q, k, v, attention.attention_mask(seg, seg), scale)
    for packed in (False, True):
        out = attention.cudnn_attention(q, k, v, seg, seg, scale, packed)
        np.testing.assert_allclose(
            out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2, rtol=0
        )


def test_unknown_attention_implementation_and_remat_policy():
    with pytest.raises(ValueError, match="flash9"):
        _model(attention_impl="flash9")
    with pytest.raises(ValueError, match="everything"):
        _model(remat_policy="everything")


def test_cache_overflow_is_loud():
    model = _model()
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit a KV cache of 8"):
        model(_tokens(1, 9), cache=cache)
    _, cache = _cached(model, _tokens(1, 6), cache)
    logits, _ = _cached(model, _tokens(1, 4), cache)  # slots 6..9 of 8
    assert np.isnan(np.asarray(logits)).all()


def test_tokens_must_be_integer_batches():
    import jaxtyping

    model = _model()
    bad = [
        ((jnp.arange(7),), {}, r"rank 1 \(shape \(7,\)\) but expected 2"),
        ((jnp.ones((1, 7)),), {}, "float32"),
        ((jnp.ones((1, 7), jnp.int32),), {"segment_ids_BT": jnp.ones((1, 6), jnp.int32)}, "shape"),
    ]
    for args, kwargs, chex_message in bad:
        # The signature's annotations refuse them (checked under the tests) ...
        with pytest.raises(jaxtyping.TypeCheckError):
            model(*args, **kwargs)
        # ... and without the annotation checks, chex names the shape or dtype.
        with pytest.raises(AssertionError, match=chex_message):
            Llama.__call__.__wrapped__(model, *args, **kwargs)


def test_the_model_face_checks_its_shape_annotations():
    """Llama.__call__ and the losses are shape-annotated in the dimension alphabet and
    checked under the tests (LLAMA_JAX_TYPECHECK=1): a segment_ids of another shape than
    the tokens is refused at the call."""
    import jaxtyping

    from llama_jax import nn as nn_face

    model = Llama(get_preset("tiny"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    assert model(tokens, segment_ids_BT=jnp.ones((2, 8), jnp.int32)).shape == (2, 8, 263)
    with pytest.raises(jaxtyping.TypeCheckError, match="segment_ids_BT"):
        model(tokens, segment_ids_BT=jnp.ones((2, 9), jnp.int32))
    h = jnp.zeros((2, 8, 48), jnp.float32)
    unembed = model.unembed
    with pytest.raises(jaxtyping.TypeCheckError, match="targets_BT"):
        nn_face.chunked_cross_entropy(h, unembed, jnp.zeros((2, 7), jnp.int32), tokens)
    with pytest.raises(jaxtyping.TypeCheckError, match="targets_BT"):
        nn_face.chunked_cross_entropy(h, unembed, jnp.zeros((2, 8), jnp.float32), tokens)
