"""A distillation run's configuration: the teacher, the distillation loss and its
schedules, hidden-state and on-policy distillation, and structured pruning at start-up.

`DistillConfig.of` types the `teacher`, `distill` and `structured` sections of a
configs/base.py `distill_config` on top of the training sections `train.RunConfig`
reads; `typed_config` picks whichever of the two a config is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from llama_jax import compress, train
from llama_jax.errors import ConfigError
from llama_jax.nn import DistillLossConfig
from llama_jax.train import DTYPES, ModelSpec, RunConfig, check_int, fields_of


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """The frozen teacher: a model directory, or a preset for shapes alone (ahead of
    time compilation); computed and held in `dtype`. With `logits_dir` its cached top-k
    distributions replace it in the step (its directory gives the architecture only)."""

    model_dir: str = ""
    preset: str = ""
    dtype: str = "bfloat16"
    scan_layers: bool = True
    attention_impl: str = "auto"
    logits_dir: str = ""  # its cached top-k distributions (launch.teacher_logits)

    def kwargs(self) -> dict[str, Any]:
        """The teacher's `Llama` keyword arguments: no remat (it takes no gradient)."""
        return dict(
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.dtype(self.dtype),
            scan_layers=self.scan_layers,
            remat_policy="none",
            attention_impl=self.attention_impl,
        )


@dataclasses.dataclass(frozen=True)
class OnPolicySpec:
    """On-policy distillation (GKD): on a fraction `lmbda` of the steps the student
    continues prompts by up to `max_new_tokens` sampled tokens (at `temperature`; 0 is
    greedy) and the loss covers those tokens only; the divergence on every step is the
    generalized JSD of `beta` (0: forward KL, 1: reverse KL). Prompts are cut from the
    training rows at a random point (at least `min_prompt` tokens kept), or read from a
    JSONL file (`prompts`, key `prompt_field`)."""

    lmbda: float = 0.5
    beta: float = 0.5
    temperature: float = 1.0
    max_new_tokens: int = 0
    prompts: str = ""
    prompt_field: str = "prompt"
    min_prompt: int = 8


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """The distillation loss, its schedules (an `_end` < 0 keeps the value fixed), the
    held-out evaluation, and hidden-state (feature) distillation: `features` pairs
    (student layer, teacher layer) whose outputs are matched by MSE and/or cosine
    distance with those weights, through a learned [D_student, D_teacher] projection
    when `feature_projection` is "always", or "auto" and the widths differ."""

    loss: DistillLossConfig
    alpha_end: float = -1.0
    temperature_end: float = -1.0
    eval_path: str = ""
    eval_every: int = 0
    eval_batches: int = 4
    features: tuple[tuple[int, int], ...] = ()
    feature_mse: float = 1.0
    feature_cosine: float = 0.0
    feature_projection: str = "auto"
    on_policy: OnPolicySpec | None = None


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunConfig):
    """A checked distillation config: a RunConfig with the teacher, the distillation
    settings, and the structured targets (None when off)."""

    teacher: TeacherSpec | None = None
    distill: DistillSpec | None = None
    structured: compress.StructuredConfig | None = None

    @classmethod
    def of(cls, cfg) -> DistillConfig:
        """`cfg` checked and typed: a DistillConfig is returned as it is; a ConfigDict or
        a nested mapping with teacher and distill sections is converted. Raises
        ConfigError or DataError naming the field."""
        if isinstance(cfg, DistillConfig):
            return cfg
        raw = train.plain_config(cfg)
        common = train.parse_sections(raw)
        structured_cfg = compress.parse_structured(raw.get("structured"))
        if structured_cfg is not None and "teacher" not in raw:
            _check_structured(common["model"], None, None, common["lora"])
        teacher, distill = _parse_distillation(raw)
        lora_cfg = common["lora"]
        if lora_cfg is not None and (common["model"].teacher_layers or lora_cfg.dropout):
            raise ConfigError(
                f"lora.rank={lora_cfg.rank} in distillation trains adapters over the frozen "
                "student in model.model_dir: model.teacher_layers cannot build it, and "
                f"lora.dropout={lora_cfg.dropout} is not applied there (set it to 0)"
            )
        if structured_cfg is not None:
            _check_structured(common["model"], teacher, distill, lora_cfg)
        if teacher.logits_dir:
            _check_cached_teacher(common["model"], distill, structured_cfg)
        return cls(**common, teacher=teacher, distill=distill, structured=structured_cfg)


def is_distillation(cfg) -> bool:
    """Whether `cfg` (typed or not) is a distillation config."""
    if isinstance(cfg, RunConfig):
        return isinstance(cfg, DistillConfig)
    raw = train.plain_config(cfg)
    return any(name in raw for name in train.DISTILL_SECTIONS)


def typed_config(cfg) -> RunConfig:
    """`cfg` typed as what it is: a DistillConfig when it has distillation sections,
    else a train.RunConfig."""
    return DistillConfig.of(cfg) if is_distillation(cfg) else RunConfig.of(cfg)


def _check_structured(model: ModelSpec, teacher, distill, lora_cfg) -> None:
    if teacher is None:
        raise ConfigError(
            "structured pruning at start-up needs a distillation config: the student is the "
            "teacher sliced to the structured targets (launch.prune --structured prunes a "
            "model directory on its own)"
        )
    if model.model_dir or model.teacher_layers or lora_cfg is not None:
        raise ConfigError(
            "with structured targets the student starts as the pruned teacher; leave "
            "model.model_dir, model.teacher_layers and lora.rank unset"
        )


def _check_cached_teacher(model: ModelSpec, distill: DistillSpec, structured_cfg) -> None:
    """What cannot run without the teacher's weights in the step."""
    needs = [
        (bool(distill.features), "distill.features (the cache holds no hidden states)"),
        (distill.on_policy is not None, "distill.on_policy (the teacher scores new samples)"),
        (bool(model.teacher_layers), "model.teacher_layers (built from the teacher's weights)"),
        (structured_cfg is not None, "structured pruning (it slices the teacher's weights)"),
    ]
    refused = [why for on, why in needs if on]
    if refused:
        raise ConfigError(
            "teacher.logits_dir replaces the live teacher, which these need: " + "; ".join(refused)
        )


def _parse_distillation(raw: Mapping[str, Any]) -> tuple[TeacherSpec, DistillSpec]:
    if "teacher" not in raw or "distill" not in raw:
        raise ConfigError("a distillation config needs both 'teacher' and 'distill' sections")
    teacher = TeacherSpec(**fields_of(TeacherSpec, raw["teacher"], "teacher"))
    if teacher.dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype={teacher.dtype!r}; expected one of {DTYPES}")
    d = dict(raw["distill"])
    on_policy = _parse_on_policy(d.pop("on_policy", None), d, raw["data"].get("seq_len", 2048))
    loss_names = ("kind", "temperature", "alpha", "beta", "top_k")
    loss = DistillLossConfig(**{k: d.pop(k) for k in loss_names if k in d})
    d["on_policy"] = on_policy
    d["features"] = parse_feature_map(d.get("features", ""))
    spec = DistillSpec(**fields_of(DistillSpec, d, "distill"), loss=loss)
    if spec.eval_every < 0 or spec.eval_batches < 1:
        raise ConfigError(
            f"distill.eval_every={spec.eval_every} must be >= 0 and "
            f"distill.eval_batches={spec.eval_batches} >= 1"
        )
    if spec.feature_projection not in ("auto", "always", "never"):
        raise ConfigError(
            f"distill.feature_projection={spec.feature_projection!r}; expected 'auto', "
            "'always' or 'never'"
        )
    weights = (spec.feature_mse, spec.feature_cosine)
    if spec.features and (min(weights) < 0 or max(weights) <= 0):
        raise ConfigError(
            f"distill.feature_mse={spec.feature_mse} and distill.feature_cosine="
            f"{spec.feature_cosine}: expected weights >= 0, at least one > 0"
        )
    return teacher, spec


def _parse_on_policy(section, distill: dict, seq_len: int) -> OnPolicySpec | None:
    """The checked OnPolicySpec, or None when off (max_new_tokens 0). On-policy runs
    train on the divergence alone, the generalized JSD of `beta`: `distill` (the
    section, edited in place) then gets the matching kind and beta."""
    if not section:
        return None
    spec = OnPolicySpec(**fields_of(OnPolicySpec, section, "distill.on_policy"))
    if spec.max_new_tokens == 0:
        default = OnPolicySpec()
        asked = [
            f"distill.on_policy.{name}={getattr(spec, name)!r}"
            for name in ("lmbda", "beta", "temperature", "prompts")
            if getattr(spec, name) != getattr(default, name)
        ]
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} asks for on-policy distillation, but "
                "distill.on_policy.max_new_tokens=0 samples nothing; set max_new_tokens "
                "(tokens the student samples per step)"
            )
        return None
    for name in ("lmbda", "beta"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"distill.on_policy.{name}={value!r}; expected a number in [0, 1]")
    if not spec.temperature >= 0:
        raise ConfigError(
            f"distill.on_policy.temperature={spec.temperature!r}; expected >= 0 (0: greedy)"
        )
    check_int("distill.on_policy.min_prompt", spec.min_prompt, 1)
    check_int("distill.on_policy.max_new_tokens", spec.max_new_tokens, 1)
    if spec.max_new_tokens > seq_len - spec.min_prompt:
        raise ConfigError(
            f"distill.on_policy.max_new_tokens={spec.max_new_tokens} does not fit rows of "
            f"data.seq_len={seq_len} with a prompt of at least min_prompt={spec.min_prompt}"
            f" tokens; expected at most {seq_len - spec.min_prompt}"
        )
    if distill.get("alpha", 0.5) != 1.0 or distill.get("alpha_end", -1.0) >= 0:
        raise ConfigError(
            f"distill.alpha={distill.get('alpha')}: on-policy distillation trains on the "
            "divergence alone (the student's own samples have no data targets); set "
            "distill.alpha=1 and leave alpha_end unset"
        )
    if distill.get("kind", "forward_kl") != "forward_kl":
        raise ConfigError(
            f"distill.kind={distill['kind']!r}: with on_policy the divergence is set by "
            "distill.on_policy.beta (0 forward KL, 1 reverse KL, between: generalized JSD)"
        )
    if spec.beta == 0:
        distill["kind"] = "forward_kl"
    elif spec.beta == 1:
        distill["kind"] = "reverse_kl"
    else:
        distill["kind"], distill["beta"] = "jsd", spec.beta
    return spec


def parse_feature_map(spec) -> tuple[tuple[int, int], ...]:
    """`distill.features` as (student layer, teacher layer) pairs: from
    'student:teacher,...' (e.g. '3:7,7:15') or a sequence of pairs."""
    if isinstance(spec, str):
        pairs = []
        for item in filter(None, (x.strip() for x in spec.split(","))):
            s, sep, t = item.partition(":")
            try:
                if not sep:
                    raise ValueError
                pairs.append((int(s), int(t)))
            except ValueError:
                raise ConfigError(
                    f"distill.features={spec!r}: {item!r} is not STUDENT_LAYER:TEACHER_LAYER"
                ) from None
    else:
        pairs = [tuple(int(x) for x in p) for p in spec or ()]
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students) or any(i < 0 for p in pairs for i in p):
        raise ConfigError(f"distill.features={spec!r}: each student layer once, all indices >= 0")
    return tuple(pairs)
