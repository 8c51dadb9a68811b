"""The distillation step: the loss of a student against a frozen teacher (live, or
its cached top-k distributions), optionally with hidden-state matching, under the
training step's accumulation, clipping and NaN guard (`train_step.make_step`).

The teacher's hidden states and logits are computed without gradients; the loss is
alpha * KD + (1 - alpha) * CE (`losses.chunked_distill_loss`, float32, in chunks of
positions), plus the feature distance of `FeatureMatch` when set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import compress, train
from llama_jax.config import LlamaConfig
from llama_jax.distill import cache as logit_cache
from llama_jax.distill import records as logit_records
from llama_jax.distill.spec import DistillConfig
from llama_jax.errors import ConfigError
from llama_jax.nn import DistillLossConfig, chunked_distill_loss, chunked_sparse_distill_loss


def linear_schedule(start: float, end: float, total_steps: int):
    """step -> start + (end - start) * step / total_steps, or `start` when end < 0."""
    if end < 0:
        return lambda step: jnp.asarray(start, jnp.float32)
    return lambda step: start + (end - start) * jnp.minimum(step / total_steps, 1.0)


PROJECTION = "feature_projection"  # the trained parameters' key of the learned projection


@dataclasses.dataclass(frozen=True)
class FeatureMatch:
    """Hidden-state distillation: the outputs of `student_layers` are matched to those
    of `teacher_layers` (pairwise) by `mse` * mean squared error + `cosine` * (1 -
    cosine similarity), per token and averaged over the pairs; through the trained
    projection params[PROJECTION]["kernel"] float[M, D_student, D_teacher] when
    `projected`."""

    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    mse: float
    cosine: float
    projected: bool


def feature_distance(x_student_MBTD, x_teacher_MBTE, projection_MDE, match: FeatureMatch):
    """float32[B, T]: the weighted feature distance of each token, averaged over the M
    matched layers. x_student: [M, B, T, D]; x_teacher: [M, B, T, E] (E the teacher's
    width); projection: float[M, D, E], or None when D == E."""
    s = x_student_MBTD.astype(jnp.float32)
    t = jax.lax.stop_gradient(x_teacher_MBTE).astype(jnp.float32)
    if projection_MDE is not None:
        s = jnp.einsum("MBTD,MDE->MBTE", s, projection_MDE.astype(jnp.float32))
    out = jnp.zeros(s.shape[1:3], jnp.float32)
    if match.mse:
        out += match.mse * jnp.mean(jnp.square(s - t), axis=(0, 3))
    if match.cosine:
        dot = jnp.sum(s * t, axis=-1)
        norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
        out += match.cosine * jnp.mean(1.0 - dot / jnp.maximum(norms, 1e-6), axis=0)
    return out


def make_distill_step(
    student_graphdef,
    teacher_graphdef,
    tx,
    schedule,
    loss_cfg: DistillLossConfig,
    *,
    alpha_fn,
    temperature_fn,
    grad_accum: int = 1,
    loss_chunk: int = 512,
    features: FeatureMatch | None = None,
    cached: logit_records.Layout | None = None,
    teacher_nll: bool = False,
):
    """Returns step(state, batch, frozen) -> (state, metrics), not yet jitted.

    frozen: {"teacher": the teacher's params} and, for a LoRA student, "base": the
    frozen student base the state's adapters are combined with. cached: the layout of
    the teacher's cached top-k records, which the batch then carries
    (logit_cache.RECORDS) in place of a teacher in `frozen`. teacher_nll: also report
    the teacher's negative log-likelihood of the scored tokens (`teacher_nll`; with a
    live teacher only), which costs one more reduction over V per token.

    The teacher's hidden states are computed without gradients; the loss is
    alpha * KD + (1 - alpha) * CE with alpha and the temperature following
    `alpha_fn(step)` and `temperature_fn(step)`, plus the feature distance of
    `features` when given (the state's params then hold the student's and, when
    projected, params[PROJECTION]). Metrics add `kd`, `ce`, `alpha` and `temperature`
    to the training ones, and `feature` with features.
    """

    def loss_sum(params, micro, step, frozen=None):
        frozen = frozen or {}
        params = dict(params)
        projection = params.pop(PROJECTION, None)
        if "base" in frozen:
            params = compress.combine(jax.lax.stop_gradient(frozen["base"]), params)
        student = nnx.merge(student_graphdef, params)
        kwargs = dict(segment_ids_BT=micro["segment_ids"])
        alpha, temperature = alpha_fn(step), temperature_fn(step)
        if cached is not None:
            h_student, _ = student.hidden_states(micro["tokens"], **kwargs)
            out = chunked_sparse_distill_loss(
                h_student,
                lambda h: student.unembed(h, out_dtype=jnp.float32),
                *logit_records.decode(cached, micro[logit_cache.RECORDS]),
                micro["targets"],
                micro["loss_mask"],
                loss_cfg,
                chunk=loss_chunk,
                alpha=alpha,
                temperature=temperature,
            )
            return out["loss_sum"], _aux(out, alpha, temperature)
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(frozen["teacher"]))
        if features is None:
            h_teacher, _ = teacher.hidden_states(micro["tokens"], **kwargs)
            h_student, _ = student.hidden_states(micro["tokens"], **kwargs)
        else:
            h_teacher, x_teacher = teacher.layer_states(
                micro["tokens"], features.teacher_layers, **kwargs
            )
            h_student, x_student = student.layer_states(
                micro["tokens"], features.student_layers, **kwargs
            )
        out = chunked_distill_loss(
            h_student,
            lambda h: student.unembed(h, out_dtype=jnp.float32),
            jax.lax.stop_gradient(h_teacher),
            lambda h: teacher.unembed(h, out_dtype=jnp.float32),
            micro["targets"],
            micro["loss_mask"],
            loss_cfg,
            chunk=loss_chunk,
            alpha=alpha,
            temperature=temperature,
            teacher_nll=teacher_nll,
        )
        aux = _aux(out, alpha, temperature)
        if teacher_nll:
            aux["teacher_nll"] = out["teacher_ce_sum"]
        total = out["loss_sum"]
        if features is not None:
            kernel = None if projection is None else projection["kernel"]
            per_token = feature_distance(x_student, x_teacher, kernel, features)
            aux["feature"] = jnp.sum(per_token * (micro["loss_mask"] != 0))
            total = total + aux["feature"]
        return total, aux

    return train.make_step(loss_sum, tx, schedule, grad_accum=grad_accum)


def _aux(out, alpha, temperature) -> dict[str, jax.Array]:
    count = out["count"]
    return {
        "count": count,
        "kd": out["kd_sum"],
        "ce": out["ce_sum"],
        # Reported as means over tokens like the sums, so weight them by the count.
        "alpha": alpha * count,
        "temperature": temperature * count,
    }


def feature_match(
    cfg: DistillConfig, student_config: LlamaConfig, teacher_config: LlamaConfig
) -> FeatureMatch | None:
    """The checked FeatureMatch of `distill.features`, or None without features."""
    d = cfg.distill
    if not d.features:
        return None
    for who, layers, config in (
        ("student", [s for s, _ in d.features], student_config),
        ("teacher", [t for _, t in d.features], teacher_config),
    ):
        bad = [i for i in layers if i >= config.num_layers]
        if bad:
            raise ConfigError(
                f"distill.features names {who} layer(s) {bad}; the {who} has "
                f"{config.num_layers} layers (0..{config.num_layers - 1})"
            )
    equal = student_config.embed_dim == teacher_config.embed_dim
    if d.feature_projection == "never" and not equal:
        raise ConfigError(
            f"distill.feature_projection='never', but the student's width "
            f"{student_config.embed_dim} is not the teacher's {teacher_config.embed_dim}; "
            "features of different widths need the learned projection ('auto')"
        )
    return FeatureMatch(
        student_layers=tuple(s for s, _ in d.features),
        teacher_layers=tuple(t for _, t in d.features),
        mse=d.feature_mse,
        cosine=d.feature_cosine,
        projected=d.feature_projection == "always" or not equal,
    )
