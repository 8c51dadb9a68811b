"""Chunked distillation losses against full-logit formulas: values, gradients, masks,
configuration errors, and the memory the chunking saves."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.nn.losses import DistillLossConfig, chunked_cross_entropy, chunked_distill_loss

B, T, D_STUDENT, D_TEACHER, V = 3, 37, 11, 13, 53


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    mask = rng.random((B, T)) < 0.8
    mask[:, -3:] = False  # masked positions inside the last, padded chunk too
    return dict(
        h_s=f32(B, T, D_STUDENT),
        w_s=f32(D_STUDENT, V) * 0.7,
        h_t=f32(B, T, D_TEACHER),
        w_t=f32(D_TEACHER, V) * 0.9,
        targets=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        mask=jnp.asarray(mask, jnp.float32),
    )


def _chunked(cfg, chunk, **overrides):
    """(h_s, w_s, h_t, w_t, targets, mask) -> dict of sums, from chunked_distill_loss."""

    def fn(h_s, w_s, h_t, w_t, targets, mask):
        return chunked_distill_loss(
            h_s, lambda h: h @ w_s, h_t, lambda h: h @ w_t, targets, mask, cfg,
            chunk=chunk, teacher_nll=True, **overrides,
        )  # fmt: skip

    return fn


def _naive_kl(p, log_p, log_q):
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _naive(cfg, temperature=None, alpha=None):
    """The same sums from full [B, T, V] logits, top-k as a mask over the vocabulary."""
    temperature = cfg.temperature if temperature is None else temperature
    alpha = cfg.alpha if alpha is None else alpha

    def fn(h_s, w_s, h_t, w_t, targets, mask):
        z_s = (h_s @ w_s).astype(jnp.float32)
        z_t = jax.lax.stop_gradient((h_t @ w_t).astype(jnp.float32))
        ce = jax.nn.logsumexp(z_s, -1) - jnp.take_along_axis(z_s, targets[..., None], -1)[..., 0]
        ce_t = jax.nn.logsumexp(z_t, -1) - jnp.take_along_axis(z_t, targets[..., None], -1)[..., 0]
        s, t = z_s / temperature, z_t / temperature
        keep = jnp.ones(t.shape, bool)
        if cfg.top_k:
            keep = t >= jnp.sort(t, axis=-1)[..., -cfg.top_k, None]
        log_p = jax.nn.log_softmax(jnp.where(keep, t, -1e30))
        p = jnp.where(keep, jnp.exp(log_p), 0.0)
        restrict_q = cfg.top_k and cfg.kind != "forward_kl"
        log_q = jax.nn.log_softmax(jnp.where(keep, s, -1e30) if restrict_q else s)
        q = jnp.where(keep, jnp.exp(log_q), 0.0) if restrict_q else jnp.exp(log_q)
        if cfg.kind == "forward_kl":
            kd = _naive_kl(p, log_p, log_q)
        elif cfg.kind == "reverse_kl":
            kd = _naive_kl(q, log_q, log_p)
        else:
            m = cfg.beta * p + (1 - cfg.beta) * q
            log_m = jnp.log(jnp.where(m > 0, m, 1.0))
            kd = cfg.beta * _naive_kl(p, log_p, log_m) + (1 - cfg.beta) * _naive_kl(q, log_q, log_m)
        kd_sum = temperature**2 * jnp.sum(mask * kd)
        ce_sum = jnp.sum(mask * ce)
        return {
            "kd_sum": kd_sum,
            "ce_sum": ce_sum,
            "teacher_ce_sum": jnp.sum(mask * ce_t),
            "loss_sum": alpha * kd_sum + (1 - alpha) * ce_sum,
            "count": jnp.sum(mask),
        }

    return fn


def _close(actual, expected, tol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(
        actual, expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max())
    )


KINDS = ("forward_kl", "reverse_kl", "jsd")
CONFIGS = [
    DistillLossConfig(kind=kind, top_k=top_k, alpha=0.7, beta=0.3)
    for kind in KINDS
    for top_k in (0, 5)
]
TEMPERATURES = (1.0, 2.0)
# Chunks that do not divide T (the last one padded), and for one configuration a single
# chunk longer than the sequence.
CHUNKS = {cfg: 64 if cfg == CONFIGS[-1] else 8 for cfg in CONFIGS}


def _grads_and_sums(fn, x):
    """Grads of loss_sum w.r.t. h_s, w_s, h_t, w_t and mask, and the sums. Where the mask
    is non-zero its gradient is that token's own loss_sum term."""

    def loss(h_s, w_s, h_t, w_t, mask):
        sums = fn(h_s, w_s, h_t, w_t, x["targets"], mask)
        return sums["loss_sum"], sums

    args = x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["mask"]
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*args)


@jax.jit
def _naive_all(x, temperature, alpha):
    # One program for every configuration compiles faster than one each.
    return [_grads_and_sums(_naive(cfg, temperature, alpha), x) for cfg in CONFIGS]


@functools.cache
def _chunked_grads(cfg):
    return jax.jit(
        lambda x, temperature, alpha: _grads_and_sums(
            _chunked(cfg, CHUNKS[cfg], temperature=temperature, alpha=alpha), x
        )
    )


def _value_and_grads(cfg, x, temperature, alpha=None, naive=False):
    """(sums, grads) of cfg in CONFIGS, chunked in CHUNKS[cfg] or from full logits.
    Temperature and alpha are traced: one compilation serves all their values."""
    args = x, jnp.float32(temperature), jnp.float32(cfg.alpha if alpha is None else alpha)
    grads, sums = _naive_all(*args)[CONFIGS.index(cfg)] if naive else _chunked_grads(cfg)(*args)
    return sums, grads


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-k{c.top_k}")
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_full_logits_in_value_and_gradient(cfg, temperature):
    x = _inputs()
    expected, expected_grads = _value_and_grads(cfg, x, temperature, naive=True)
    sums, grads = _value_and_grads(cfg, x, temperature)
    assert set(sums) == {"kd_sum", "ce_sum", "teacher_ce_sum", "loss_sum", "count"}
    for key in sums:
        assert sums[key].dtype == jnp.float32 and sums[key].shape == ()
        _close(sums[key], expected[key])
    assert float(sums["kd_sum"]) > 1.0
    assert float(sums["count"]) == float(x["mask"].sum())
    for got, want in zip(grads[:2], expected_grads[:2], strict=True):
        _close(got, want)
    assert not np.any(np.asarray(grads[2])), "a gradient reached the teacher's hidden states"
    assert not np.any(np.asarray(grads[3])), "a gradient reached the teacher's unembedding"
    # Per token: d loss_sum / d mask is each counted token's own term.
    counted = np.asarray(x["mask"]) != 0
    _close(np.asarray(grads[4])[counted], np.asarray(expected_grads[4])[counted])


def test_cross_entropy_part_matches_chunked_cross_entropy():
    x = _inputs()
    sums, _ = _value_and_grads(CONFIGS[0], x, 1.0)
    ce, count = chunked_cross_entropy(
        x["h_s"], lambda h: h @ x["w_s"], x["targets"], x["mask"], chunk=8
    )
    _close(sums["ce_sum"], ce)
    assert float(count) == float(sums["count"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.kind}-k{c.top_k}")
def test_identical_distributions_give_zero_and_never_negative(cfg):
    x = _inputs(1)
    x["w_s"] = x["w_s"] * 3.0
    # The teacher computes the student's logits: its extra hidden units meet zero weights.
    x["h_t"] = jnp.pad(x["h_s"], [(0, 0), (0, 0), (0, D_TEACHER - D_STUDENT)])
    x["w_t"] = jnp.pad(x["w_s"], [(0, D_TEACHER - D_STUDENT), (0, 0)])
    x["mask"] = jnp.ones((B, T), jnp.float32)
    for temperature in TEMPERATURES:
        # With alpha = 1, the mask's gradient is each token's divergence x T**2.
        _, grads = _value_and_grads(cfg, x, temperature, alpha=1.0)
        d = np.asarray(grads[4]) / temperature**2
        assert d.min() >= 0.0
        if cfg.kind == "forward_kl" and cfg.top_k:
            # The student keeps its mass outside the teacher's top k: KL(p_k || q) is
            # -log q(top k).
            log_q = jax.nn.log_softmax((x["h_s"] @ x["w_s"]) / temperature)
            mass = jnp.exp(jax.lax.top_k(log_q, cfg.top_k)[0]).sum(-1)
            _close(d, -np.log(mass))
            assert d.max() > 1e-3
        else:
            np.testing.assert_allclose(d, 0.0, atol=1e-6)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4]], ids=lambda c: f"{c.kind}-k{c.top_k}")
def test_masked_positions_change_nothing(cfg):
    x = _inputs()
    sums, grads = _value_and_grads(cfg, x, 2.0)
    off = np.asarray(x["mask"] == 0)[..., None]
    rng = np.random.default_rng(7)
    y = dict(x)
    y["h_s"] = jnp.where(off, 50.0 * rng.normal(size=x["h_s"].shape), x["h_s"])
    y["h_t"] = jnp.where(off, 50.0 * rng.normal(size=x["h_t"].shape), x["h_t"])
    y["targets"] = jnp.where(off[..., 0], 0, x["targets"])
    sums2, grads2 = _value_and_grads(cfg, y, 2.0)
    for key in sums:
        np.testing.assert_array_equal(sums[key], sums2[key])
    np.testing.assert_allclose(grads[1], grads2[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.where(off, 0.0, grads[0]), np.where(off, 0.0, grads2[0]), rtol=1e-6, atol=1e-7
    )
    assert not np.any(np.asarray(grads2[0])[off[..., 0]])


@pytest.mark.parametrize("cfg", CONFIGS[1::2], ids=lambda c: c.kind)
def test_all_masked_gives_zeros_without_nan(cfg):
    x = _inputs()
    x["mask"] = jnp.zeros((B, T), jnp.float32)
    sums, grads = _value_and_grads(cfg, x, 2.0)
    for key in sums:
        assert float(sums[key]) == 0.0, key
    for g in grads:
        assert np.all(np.isfinite(g)) and not np.any(np.asarray(g))


def test_ruled_out_tokens_contribute_zero_without_nan():
    # Both models give some tokens a logit of -inf (as for padded vocabulary entries): a
    # probability of exactly 0, with 0 log 0 = 0. A logit of -1e4 gives the same
    # probability through finite arithmetic, so both must agree, value and gradient.
    x = _inputs()
    ruled_out = jnp.arange(V) % 7 == 0

    def kd_and_grads(kind, fill):
        def kd(h_s, w_s):
            sums = chunked_distill_loss(
                h_s, lambda h: jnp.where(ruled_out, fill, h @ w_s),
                x["h_t"], lambda h: jnp.where(ruled_out, fill, h @ x["w_t"]),
                x["targets"], x["mask"], DistillLossConfig(kind=kind), chunk=8,
            )  # fmt: skip
            return sums["kd_sum"]

        return jax.value_and_grad(kd, argnums=(0, 1))(x["h_s"], x["w_s"])

    results = jax.jit(
        lambda: {k: (kd_and_grads(k, -jnp.inf), kd_and_grads(k, -1e4)) for k in KINDS}
    )()
    for kind, (got, want) in results.items():
        assert float(got[0]) > 1.0, kind
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.all(np.isfinite(a)), kind
            _close(a, b)


def test_alpha_mixes_and_alpha_and_temperature_can_be_traced():
    x, cfg = _inputs(), CONFIGS[4]
    traces = []

    @jax.jit
    def scheduled(alpha, temperature):
        traces.append(1)
        return _chunked(cfg, 8, alpha=alpha, temperature=temperature)(*x.values())

    for alpha, temperature in [(0.0, 1.0), (0.6, 3.0), (1.0, 2.0)]:
        got = scheduled(jnp.float32(alpha), jnp.float32(temperature))
        want, _ = _value_and_grads(cfg, x, temperature, alpha, naive=True)
        for key in got:
            _close(got[key], want[key])
        _close(got["loss_sum"], alpha * got["kd_sum"] + (1 - alpha) * got["ce_sum"])
    assert len(traces) == 1

    # Without overrides, cfg's alpha and temperature apply.
    cfg = dataclasses.replace(cfg, alpha=0.25, temperature=3.0)
    got = jax.jit(_chunked(cfg, 8))(*x.values())
    want, _ = _value_and_grads(CONFIGS[4], x, 3.0, 0.25, naive=True)
    for key in got:
        _close(got[key], want[key])
    _close(got["loss_sum"], 0.25 * got["kd_sum"] + 0.75 * got["ce_sum"])


def test_bfloat16_inputs_give_float32_sums_near_float32():
    x, cfg = _inputs(), CONFIGS[2]
    ref, _ = _value_and_grads(cfg, x, 2.0)
    low = {k: v.astype(jnp.bfloat16) if k.startswith(("h_", "w_")) else v for k, v in x.items()}
    sums = jax.jit(_chunked(cfg, CHUNKS[cfg], temperature=2.0))(*low.values())
    for key in sums:
        assert sums[key].dtype == jnp.float32
        np.testing.assert_allclose(sums[key], ref[key], rtol=3e-2)


def test_vocabulary_mismatch_names_both_sizes():
    x = _inputs()
    x["w_t"] = jnp.ones((D_TEACHER, V + 6), jnp.float32)
    with pytest.raises(ValueError, match=rf"V={V}\b.*V={V + 6}\b"):
        _chunked(DistillLossConfig(), 8)(*x.values())


def test_top_k_larger_than_vocabulary_is_an_error():
    with pytest.raises(ValueError, match=rf"top_k={V + 1}.*V={V}"):
        _chunked(DistillLossConfig(top_k=V + 1), 8)(*_inputs().values())


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("beta", 0.0),
        ("beta", 1.0),
        ("top_k", -1),
        ("top_k", 2.5),
        ("kind", "kl"),
    ],
)
def test_bad_config_is_an_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        DistillLossConfig(**{field: value})


def test_bad_overrides_are_errors():
    x = _inputs()
    with pytest.raises(ValueError, match="alpha=2"):
        _chunked(DistillLossConfig(), 8, alpha=2)(*x.values())
    with pytest.raises(ValueError, match="temperature=0"):
        _chunked(DistillLossConfig(), 8, temperature=0)(*x.values())


def test_chunking_keeps_loss_memory_to_a_chunk():
    cfg = DistillLossConfig(kind="jsd", top_k=8)
    b, t, d, v, chunk = 2, 1024, 16, 4096, 128
    shapes = [(b, t, d), (d, v), (b, t, d), (d, v), (b, t), (b, t)]
    dtypes = [jnp.float32] * 4 + [jnp.int32, jnp.float32]
    args = [jax.ShapeDtypeStruct(s, dt) for s, dt in zip(shapes, dtypes, strict=True)]

    def temp_bytes(fn):
        grad = jax.grad(lambda *a: fn(*a)["loss_sum"], argnums=(0, 1))
        stats = jax.jit(grad).lower(*args).compile().memory_analysis()
        if stats is None:
            pytest.skip("this backend reports no memory analysis")
        return stats.temp_size_in_bytes

    full_logits = b * t * v * 4
    naive, chunked = temp_bytes(_naive(cfg)), temp_bytes(_chunked(cfg, chunk))
    # The full-logit version holds several [B, T, V] arrays; the chunked one not even one.
    assert naive > 2 * full_logits
    assert chunked < full_logits < naive
