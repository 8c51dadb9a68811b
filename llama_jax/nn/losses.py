"""Losses computed in float32 over chunks of tokens from the final hidden states.

The unembedding runs one chunk of positions at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds the full float32 `[B, T, V]`
logits: the loss memory is one chunk's `[B, C, V]`. This holds for the distillation
loss too, where a student's and a teacher's logits are both needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import sharding
from llama_jax.errors import ConfigError
from llama_jax.nn.signatures import Float, Ids, Int, Shaped, checked

DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _chunks(x, chunk: int):
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T padded up to a multiple of chunk)."""
    b, t = x.shape[:2]
    pad = -t % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _masked_sums(per_token, arrays_BT, mask_BT, chunk: int):
    """Sums per-token values over the tokens that count, one chunk of positions at a time.

    per_token maps chunks `[B, C, ...]` of `arrays_BT` to a tuple of float32[B, C] values.
    It runs under `jax.checkpoint`, so its `[B, C, V]` intermediates are recomputed in
    the backward pass instead of being kept for every chunk. Positions past T (padding)
    carry mask 0. Returns (tuple of float32[] weighted sums, float32[] sum of the mask).
    """
    if chunk < 1:
        raise ConfigError(f"loss chunk={chunk} must be >= 1")
    chunk = min(chunk, mask_BT.shape[1])
    mask = mask_BT.astype(jnp.float32)

    @jax.checkpoint
    def one(mask_BC, *xs):
        # `where`, not only the product: a masked token contributes exactly 0 even if its
        # value is not finite.
        return tuple(jnp.sum(jnp.where(mask_BC != 0, v * mask_BC, 0.0)) for v in per_token(*xs))

    def body(carry, xs):
        return carry, one(*xs)

    xs = (_chunks(mask, chunk), *(_chunks(a, chunk) for a in arrays_BT))
    _, sums = jax.lax.scan(body, None, xs)
    return tuple(jnp.sum(s) for s in sums), jnp.sum(mask)


def _logits_f32(unembed, h_BCD):
    logits = unembed(h_BCD).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "vocab"))


def _token_cross_entropy(logits_BCV, targets_BC):
    log_z = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return log_z - target_logit


@checked
def chunked_cross_entropy(
    h_BTD: Float[jax.Array, "B T D"],
    unembed: Callable[[jax.Array], jax.Array],
    targets_BT: Int[Ids, "B T"],
    mask_BT: Shaped[Ids, "B T"],
    *,
    chunk: int = 512,
) -> tuple[Float[jax.Array, ""], Float[jax.Array, ""]]:
    """Summed token cross-entropy and the number of tokens it covers.

    h: dtype[B, T, D] final hidden states; unembed: [B, C, D] -> [B, C, V] logits;
    targets: int[B, T]; mask: [B, T], non-zero where a token counts.
    Returns (float32[] sum of -log p(target), float32[] count). Divide for the mean.
    """

    chex.assert_rank(h_BTD, 3)
    chex.assert_equal_shape([targets_BT, mask_BT])
    chex.assert_equal_shape_prefix([h_BTD, targets_BT], 2)

    def per_token(h_BCD, targets_BC):
        return (_token_cross_entropy(_logits_f32(unembed, h_BCD), targets_BC),)

    (total,), count = _masked_sums(per_token, (h_BTD, targets_BT), mask_BT, chunk)
    return total, count


def token_loss_sum(model, batch: Mapping[str, jax.Array], loss_chunk: int, dropout_keys=None):
    """(float32[] summed cross-entropy, float32[] count) of `model` on a batch, the
    unembedding chunked and in float32.

    batch: dict of int32[B, T] `tokens`, `segment_ids`, `targets`, `loss_mask`.
    dropout_keys: keys[B] for LoRA dropout, or None.
    """
    chex.assert_equal_shape([batch[k] for k in ("tokens", "segment_ids", "targets", "loss_mask")])
    h, _ = model.hidden_states(
        batch["tokens"], segment_ids_BT=batch["segment_ids"], dropout_keys=dropout_keys
    )
    return chunked_cross_entropy(
        h,
        lambda h_BCD: model.unembed(h_BCD, out_dtype=jnp.float32),
        batch["targets"],
        batch["loss_mask"],
        chunk=loss_chunk,
    )


def make_eval_step(graphdef, loss_chunk: int = 512):
    """Returns eval(params, batch) -> (float32[] summed token loss, float32[] count),
    jitted; `token_loss_sum` of the model nnx.merge(graphdef, params)."""

    def evaluate(params, batch):
        return token_loss_sum(nnx.merge(graphdef, params), batch, loss_chunk)

    return jax.jit(evaluate)


@dataclasses.dataclass(frozen=True)
class DistillLossConfig:
    """How a student is trained against a teacher's token distributions.

    kind: "forward_kl" KL(p || q), "reverse_kl" KL(q || p), or "jsd", the generalized
      Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m) with
      m = beta p + (1 - beta) q; p is the teacher's and q the student's softmax at
      `temperature`.
    temperature: > 0; the divergence is multiplied by temperature**2 so its gradient
      keeps the same scale as the temperature changes.
    alpha: in [0, 1], the weight of the divergence; 1 - alpha weights the student's
      cross-entropy against the data targets (at temperature 1).
    beta: in (0, 1), the mixing weight of "jsd".
    top_k: 0 uses the teacher's full distribution; k > 0 keeps only the teacher's k most
      likely tokens (see `chunked_distill_loss`).
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    top_k: int = 0

    def __post_init__(self):
        if self.kind not in DISTILL_KINDS:
            raise ConfigError(f"distill kind={self.kind!r}; expected one of {DISTILL_KINDS}")
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)
        if not (isinstance(self.beta, int | float) and 0 < self.beta < 1):
            raise ConfigError(f"distill beta={self.beta!r}; expected a number in (0, 1)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(
                f"distill top_k={self.top_k!r}; expected an int >= 0 (0: the full distribution)"
            )


def _check_temperature(temperature):
    if not (isinstance(temperature, int | float) and 0 < temperature < math.inf):
        raise ConfigError(f"distill temperature={temperature!r}; expected a finite number > 0")


def _check_alpha(alpha):
    if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
        raise ConfigError(f"distill alpha={alpha!r}; expected a number in [0, 1]")


def _alpha_and_temperature(cfg: DistillLossConfig, alpha, temperature):
    """float32[] alpha and temperature: cfg's, or the given ones (checked when Python
    numbers; traced schedule values are taken as they are)."""
    if alpha is None:
        alpha = cfg.alpha
    elif isinstance(alpha, int | float):
        _check_alpha(alpha)
    if temperature is None:
        temperature = cfg.temperature
    elif isinstance(temperature, int | float):
        _check_temperature(temperature)
    return jnp.asarray(alpha, jnp.float32), jnp.asarray(temperature, jnp.float32)


def _distill_sums(kd, ce, count, alpha, temperature, **extra) -> dict[str, jax.Array]:
    """The summed losses of a distillation loss: the divergence scaled by T**2."""
    kd = kd * temperature**2
    return {
        "kd_sum": kd,
        "ce_sum": ce,
        **extra,
        "loss_sum": alpha * kd + (1 - alpha) * ce,
        "count": count,
    }


def _kl(log_a, log_b):
    """sum_v a (log a - log b) over the last axis, with 0 log 0 = 0.

    Where a is 0 both logs are replaced before subtracting, so that -inf there gives
    neither a NaN value nor a NaN gradient.
    """
    a = jnp.exp(log_a)
    live = a > 0
    diff = jnp.where(live, log_a, 0.0) - jnp.where(live, log_b, 0.0)
    return jnp.sum(jnp.where(live, a * diff, 0.0), axis=-1)


def _divergence(cfg: DistillLossConfig, student_BCV, teacher_BCV, temperature):
    """Per-token divergence float32[B, C] between float32[B, C, V] logits, not yet x T**2."""
    student_BCV = student_BCV / temperature
    teacher_BCV = teacher_BCV / temperature
    if cfg.top_k:
        # Working on the k kept tokens ([B, C, top_k]) renormalises over them directly,
        # rather than masking the rest of a [B, C, V] array to probability 0.
        teacher_top, top = jax.lax.top_k(teacher_BCV, cfg.top_k)
        log_p = jax.nn.log_softmax(teacher_top, axis=-1)
        if cfg.kind == "forward_kl":
            log_q = jax.nn.log_softmax(student_BCV, axis=-1)
            log_q = jnp.take_along_axis(log_q, top, axis=-1)
        else:
            student_top = jnp.take_along_axis(student_BCV, top, axis=-1)
            log_q = jax.nn.log_softmax(student_top, axis=-1)
    else:
        log_p = jax.nn.log_softmax(teacher_BCV, axis=-1)
        log_q = jax.nn.log_softmax(student_BCV, axis=-1)

    if cfg.kind == "forward_kl":
        d = _kl(log_p, log_q)
    elif cfg.kind == "reverse_kl":
        d = _kl(log_q, log_p)
    else:
        log_bp = log_p + math.log(cfg.beta)
        log_bq = log_q + math.log1p(-cfg.beta)
        # m is 0 only where p and q both are; keep those -inf out of logaddexp, whose
        # gradient would be NaN there even though _kl ignores the token.
        live = (log_bp > -jnp.inf) | (log_bq > -jnp.inf)
        log_m = jnp.logaddexp(jnp.where(live, log_bp, 0.0), jnp.where(live, log_bq, 0.0))
        log_m = jnp.where(live, log_m, -jnp.inf)
        d = cfg.beta * _kl(log_p, log_m) + (1 - cfg.beta) * _kl(log_q, log_m)
    # A divergence is >= 0; rounding can leave a tiny negative when p and q nearly agree.
    return jnp.maximum(d, 0.0)


@checked
def chunked_distill_loss(
    h_student_BTD: Float[jax.Array, "B T D"],
    student_unembed: Callable[[jax.Array], jax.Array],
    h_teacher_BTE: Float[jax.Array, "B T E"],
    teacher_unembed: Callable[[jax.Array], jax.Array],
    targets_BT: Int[Ids, "B T"],
    mask_BT: Shaped[Ids, "B T"],
    cfg: DistillLossConfig,
    *,
    chunk: int = 512,
    alpha: float | jax.Array | None = None,
    temperature: float | jax.Array | None = None,
    teacher_nll: bool = False,
) -> dict[str, jax.Array]:
    """Summed distillation and data losses of a student against a frozen teacher.

    h_student, h_teacher: dtype[B, T, D] final hidden states, D each model's own width;
    student_unembed, teacher_unembed: that model's [B, C, D] -> [B, C, V] logits, the
    same V for both; targets: int[B, T]; mask: [B, T], non-zero where a token counts.

    With p the teacher's and q the student's softmax of logits / temperature, the
    per-token divergence (cfg.kind) is computed in float32, times temperature**2. No
    gradient reaches the teacher. With cfg.top_k = k > 0 the teacher keeps its k most
    likely tokens, renormalised; for "forward_kl" q stays the student's full
    distribution (KL(p_k || q) sums over the k tokens), while for "reverse_kl" and
    "jsd" q is also restricted to those k tokens and renormalised over them, since any
    student mass outside the teacher's support would make KL(q || p) infinite.

    alpha and temperature override cfg's and may be traced scalars (for schedules
    without recompiling).

    Returns float32[] sums over the counted tokens: "kd_sum" (divergence x T**2),
    "ce_sum" (student cross-entropy against targets at temperature 1),
    "teacher_ce_sum" (the teacher's, likewise; only with teacher_nll), "loss_sum"
    (alpha kd_sum + (1 - alpha) ce_sum) and "count" (the mask's sum). Divide by
    max(count, 1) for means.
    """
    alpha, temperature = _alpha_and_temperature(cfg, alpha, temperature)

    chex.assert_rank([h_student_BTD, h_teacher_BTE], 3)
    chex.assert_equal_shape_prefix([h_student_BTD, h_teacher_BTE, targets_BT, mask_BT], 2)
    h_teacher_BTE = jax.lax.stop_gradient(h_teacher_BTE)

    def per_token(h_student_BCD, h_teacher_BCD, targets_BC):
        student_BCV = _logits_f32(student_unembed, h_student_BCD)
        # The teacher's parameters may be closed over by its unembedding: cut them off too.
        teacher_BCV = jax.lax.stop_gradient(_logits_f32(teacher_unembed, h_teacher_BCD))
        v_student, v_teacher = student_BCV.shape[-1], teacher_BCV.shape[-1]
        if v_student != v_teacher:
            raise ConfigError(
                f"student vocabulary V={v_student} and teacher vocabulary V={v_teacher} "
                "differ; distillation needs the same vocabulary"
            )
        if cfg.top_k > v_teacher:
            raise ConfigError(
                f"distill top_k={cfg.top_k} exceeds the vocabulary size V={v_teacher}"
            )
        kd = _divergence(cfg, student_BCV, teacher_BCV, temperature)
        ce = _token_cross_entropy(student_BCV, targets_BC)
        if not teacher_nll:
            return kd, ce
        return kd, ce, _token_cross_entropy(teacher_BCV, targets_BC)

    sums, count = _masked_sums(
        per_token, (h_student_BTD, h_teacher_BTE, targets_BT), mask_BT, chunk
    )
    extra = {"teacher_ce_sum": sums[2]} if teacher_nll else {}
    return _distill_sums(sums[0], sums[1], count, alpha, temperature, **extra)


def _sparse_divergence(
    cfg: DistillLossConfig, student_BCV, ids_BCk, logp_BCk, log_tail_BC, temperature
):
    """Per-token divergence float32[B, C] between a student's float32[B, C, V] logits and
    a teacher's top-k buckets (see `chunked_sparse_distill_loss`), not yet x T**2."""
    vocab, k = student_BCV.shape[-1], ids_BCk.shape[-1]
    if 0 < cfg.top_k < k:
        # The stored tokens are most likely first: keeping fewer moves the others' mass
        # into the tail.
        log_tail_BC = jnp.logaddexp(log_tail_BC, jax.nn.logsumexp(logp_BCk[..., cfg.top_k :], -1))
        ids_BCk, logp_BCk, k = ids_BCk[..., : cfg.top_k], logp_BCk[..., : cfg.top_k], cfg.top_k
    log_q = jax.nn.log_softmax(student_BCV, axis=-1)
    teacher = [logp_BCk]
    student = [jnp.take_along_axis(log_q, ids_BCk, axis=-1)]
    # With k = V there is no tail, and a log-sum-exp over nothing would give NaN gradients.
    if k < vocab:
        rest = jnp.put_along_axis(log_q, ids_BCk, -jnp.inf, axis=-1, inplace=False)
        teacher.append(log_tail_BC[..., None])
        student.append(jax.nn.logsumexp(rest, axis=-1, keepdims=True))
    a = jax.lax.stop_gradient(jnp.concatenate(teacher, axis=-1))
    b = jnp.concatenate(student, axis=-1)
    if cfg.kind == "reverse_kl":
        # Student mass on a bucket the teacher gives none would make KL(q || p) infinite:
        # q is restricted to the teacher's support and renormalised there.
        b = jnp.where(a > -jnp.inf, b, -jnp.inf)
    # The buckets' log-probabilities act as logits over k + 1 tokens, so tempering them
    # divides by the temperature and renormalises, as for full logits.
    return _divergence(dataclasses.replace(cfg, top_k=0), b, a, temperature)


@checked
def chunked_sparse_distill_loss(
    h_student_BTD: Float[jax.Array, "B T D"],
    student_unembed: Callable[[jax.Array], jax.Array],
    teacher_ids_BTk: Int[jax.Array, "B T k"],
    teacher_logp_BTk: Float[jax.Array, "B T k"],
    teacher_log_tail_BT: Float[jax.Array, "B T"],
    targets_BT: Int[Ids, "B T"],
    mask_BT: Shaped[Ids, "B T"],
    cfg: DistillLossConfig,
    *,
    chunk: int = 512,
    alpha: float | jax.Array | None = None,
    temperature: float | jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Summed distillation and data losses of a student against a teacher's stored
    top-k distribution (e.g. `logit_records.decode` of cached records).

    h_student: dtype[B, T, D] final hidden states; student_unembed: [B, C, D] ->
    [B, C, V] logits; teacher_ids: int32[B, T, k], the teacher's k most likely tokens,
    most likely first; teacher_logp: float32[B, T, k], their log-probabilities at
    temperature 1 (-inf: no mass); teacher_log_tail: float32[B, T], the log of the mass
    of every other token (-inf: none); targets: int[B, T]; mask: [B, T], non-zero where
    a token counts.

    The divergence (cfg.kind) compares the two models on k + 1 buckets: the teacher's k
    tokens and the tail holding all other tokens, the student's tail being its exact
    mass outside those k tokens. At temperature 1 this is the divergence of the two
    distributions seen through those buckets: a lower bound on the full one, equal to it
    when the student spreads the tail as the teacher does. The teacher's buckets are
    renormalised, which absorbs the quantization of stored log-probabilities. "jsd" is
    taken on the buckets as they are; for "reverse_kl" the student is restricted to the
    buckets where the teacher has mass and renormalised there.

    Temperature: both models' buckets are tempered as if each bucket were one token,
    p_i**(1/T) renormalised. Among the k tokens this is exact (their tempered ratios
    depend on their own log-probabilities only); the tail's tempered share uses
    p_tail**(1/T) instead of the sum of its tokens' p**(1/T), which the buckets do not
    record, so for T > 1 it is smaller than a full softmax at T would give (by up to a
    factor (V - k)**(1 - 1/T)) and for T < 1 larger. Both models get the same treatment,
    so the divergence is still 0 exactly when the student's buckets equal the teacher's.
    The divergence is multiplied by T**2, as in `chunked_distill_loss`.

    cfg.top_k: 0 uses the k stored tokens; 0 < top_k < k keeps the top_k most likely and
    moves the others into the tail; top_k > k is an error. alpha and temperature override
    cfg's and may be traced scalars.

    Returns float32[] sums over the counted tokens: "kd_sum", "ce_sum" (student
    cross-entropy against targets at temperature 1), "loss_sum" (alpha kd_sum +
    (1 - alpha) ce_sum) and "count". Divide by max(count, 1) for means.
    """
    alpha, temperature = _alpha_and_temperature(cfg, alpha, temperature)

    chex.assert_rank([h_student_BTD, teacher_ids_BTk, teacher_logp_BTk], 3)
    chex.assert_equal_shape([teacher_ids_BTk, teacher_logp_BTk])
    chex.assert_equal_shape([teacher_log_tail_BT, targets_BT, mask_BT])
    chex.assert_equal_shape_prefix([h_student_BTD, teacher_ids_BTk, targets_BT], 2)
    k = teacher_ids_BTk.shape[-1]
    if cfg.top_k > k:
        raise ConfigError(f"distill top_k={cfg.top_k} exceeds the k={k} tokens the teacher stored")
    teacher = jax.lax.stop_gradient(
        (teacher_logp_BTk.astype(jnp.float32), teacher_log_tail_BT.astype(jnp.float32))
    )

    def per_token(h_student_BCD, ids_BCk, logp_BCk, log_tail_BC, targets_BC):
        student_BCV = _logits_f32(student_unembed, h_student_BCD)
        if k > student_BCV.shape[-1]:
            raise ConfigError(
                f"the teacher stored k={k} tokens; the student's vocabulary has only "
                f"V={student_BCV.shape[-1]}"
            )
        kd = _sparse_divergence(cfg, student_BCV, ids_BCk, logp_BCk, log_tail_BC, temperature)
        return kd, _token_cross_entropy(student_BCV, targets_BC)

    arrays = (h_student_BTD, teacher_ids_BTk.astype(jnp.int32), *teacher, targets_BT)
    (kd, ce), count = _masked_sums(per_token, arrays, mask_BT, chunk)
    return _distill_sums(kd, ce, count, alpha, temperature)
