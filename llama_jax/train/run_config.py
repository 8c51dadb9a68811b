"""A run's configuration, typed and checked once.

Experiments are written as `configs/*.py` files returning an `ml_collections`
ConfigDict (overridable from the command line). `RunConfig.of` turns one into frozen
dataclasses, checking every value that needs no devices or files; the library works on
those. Two fields take either a nested mapping (in config files) or a short string
(command-line sugar):

    model.overrides   {"num_layers": 8, "embed_dim": 1024}  or  "num_layers=8,embed_dim=1024"
    mesh.rules        {"vocab": "fsdp", "embed": ""}        or  "vocab=fsdp,embed="

The config as written (`RunConfig.raw`) is what runs save to `config.json` and their
checkpoints' metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from llama_jax import compress, sharding
from llama_jax.config import LlamaConfig, get_preset
from llama_jax.data import DataConfig
from llama_jax.errors import ConfigError
from llama_jax.nn import DistillLossConfig, LoraConfig
from llama_jax.train.optim import OptimizerConfig

DTYPES = ("float32", "bfloat16", "float16")
# LlamaConfig fields that are not scalars, so `model.overrides` cannot set them.
_NOT_OVERRIDABLE = ("rope_scaling", "eos_token_ids")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The trained model: a preset with overrides, or a model directory; how it runs."""

    preset: str = "tiny"
    model_dir: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    teacher_layers: str = ""  # distillation: teacher layers that initialise the student

    def kwargs(self) -> dict[str, Any]:
        """The `Llama` keyword arguments (dtypes, layer scan, remat, attention)."""
        return dict(
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.dtype(self.param_dtype),
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
        )

    def preset_config(self) -> LlamaConfig:
        """The preset with `overrides` applied."""
        try:
            config = get_preset(self.preset)
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from e
        return dataclasses.replace(config, **dict(self.overrides))


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh axis sizes (-1: the rest of the devices) and logical-axis rule overrides."""

    dcn: int = 1
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[tuple[str, tuple[str, ...] | None], ...] = ()

    def sizes(self) -> dict[str, int]:
        return dict(dcn=self.dcn, data=self.data, fsdp=self.fsdp, tensor=self.tensor)

    def rules_table(self) -> sharding.Rules:
        return sharding.rules_from_config(dict(self.rules))


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 1000
    grad_accum: int = 1
    loss_chunk: int = 1024
    log_every: int = 10
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    save_every: int = 500
    keep: int = 3
    async_save: bool = True


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
class RunConfig:
    """A checked run configuration (configs/base.py layout). `lora`, `prune`, `teacher`
    and `distill` are None when that feature is off; `tokenizer` is data.tokenizer."""

    model: ModelSpec
    mesh: MeshSpec
    data: DataConfig
    tokenizer: str
    train: TrainSpec
    checkpoint: CheckpointSpec
    raw: Mapping[str, Any]
    lora: LoraConfig | None = None
    prune: compress.PruneConfig | None = None
    teacher: TeacherSpec | None = None
    distill: DistillSpec | None = None
    structured: compress.StructuredConfig | None = None

    @classmethod
    def of(cls, cfg) -> RunConfig:
        """`cfg` checked and typed: a RunConfig is returned as it is; a ConfigDict or a
        nested mapping is converted. Raises ConfigError or DataError naming the field."""
        if isinstance(cfg, RunConfig):
            return cfg
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else _plain(cfg)
        return _parse(raw)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _plain(x):
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _fields(cls, section: Mapping[str, Any], where: str, **extra) -> dict[str, Any]:
    """The entries of `section` that are fields of `cls`; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names - set(extra))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    return {k: v for k, v in section.items() if k in names} | extra


def _check_int(where: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}={value!r}; expected an integer >= {low}")


def parse_overrides(spec, config: LlamaConfig | None = None) -> tuple[tuple[str, Any], ...]:
    """`model.overrides` as (field, value) pairs: from a mapping or from
    'name=value,...' (ints, floats, booleans), checked against LlamaConfig's scalar
    fields (and their types, taken from `config`, default the tiny preset)."""
    config = config or get_preset("tiny")
    fields = {f.name for f in dataclasses.fields(config)} - set(_NOT_OVERRIDABLE)
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for item in filter(None, (x.strip() for x in str(spec or "").split(","))):
            name, _, text = item.partition("=")
            items.append((name.strip(), text.strip()))
    out = []
    for name, value in items:
        if name not in fields:
            raise ConfigError(
                f"model.overrides: {name!r} is not a scalar LlamaConfig field; expected one "
                f"of {sorted(fields)}"
            )
        current = getattr(config, name)
        try:
            if isinstance(current, bool):
                if isinstance(value, str):
                    value = {"true": True, "false": False}[value.lower()]
                elif not isinstance(value, bool):
                    raise ValueError
            elif isinstance(current, int):
                if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                    raise ValueError
                value = int(value)
            else:
                value = float(value)
        except (KeyError, ValueError, TypeError):
            raise ConfigError(
                f"model.overrides: {name}={value!r} is not a {type(current).__name__}"
            ) from None
        out.append((name, value))
    return tuple(out)


def apply_overrides(config: LlamaConfig, spec) -> LlamaConfig:
    """`config` with the fields of `spec` (a mapping or 'name=value,...') replaced."""
    return dataclasses.replace(config, **dict(parse_overrides(spec, config)))


def parse_rules(spec) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """`mesh.rules` as (logical axis, mesh axes or None) pairs, from a mapping (values
    'fsdp', 'fsdp+tensor', a list of axes, or '' / None to replicate) or a string."""
    if isinstance(spec, Mapping):
        table = {}
        for name, axes in spec.items():
            if isinstance(axes, str):
                axes = [a for a in axes.split("+") if a]
            table[str(name)] = tuple(axes or ()) or None
    else:
        table = sharding.parse_rules(str(spec or ""))
    sharding.rules_from_config(table)
    return tuple(table.items())


def _parse(raw: Mapping[str, Any]) -> RunConfig:
    for name in ("model", "mesh", "data", "train", "checkpoint"):
        if name not in raw:
            raise ConfigError(f"the config has no {name!r} section (see configs/base.py)")
    m = dict(raw["model"])
    for name in ("dtype", "param_dtype"):
        if m.get(name, "float32") not in DTYPES:
            raise ConfigError(f"model.{name}={m[name]!r}; expected one of {DTYPES}")
    if m.get("model_dir") and m.get("overrides"):
        raise ConfigError("model.overrides applies to presets, not to model.model_dir")
    m["overrides"] = parse_overrides(m.get("overrides", ""))
    model = ModelSpec(**_fields(ModelSpec, m, "model"))

    mesh_raw = dict(raw["mesh"])
    mesh_raw["rules"] = parse_rules(mesh_raw.get("rules", ""))
    mesh = MeshSpec(**_fields(MeshSpec, mesh_raw, "mesh"))

    d = dict(raw["data"])
    tokenizer = d.pop("tokenizer", "")
    data = DataConfig(**_fields(DataConfig, d, "data"))

    t = dict(raw["train"])
    _check_int("train.steps", t.get("steps", 1000), 1)
    _check_int("train.log_every", t.get("log_every", 10), 1)
    _check_int("train.grad_accum", t.get("grad_accum", 1), 1)
    _check_int("train.loss_chunk", t.get("loss_chunk", 1024), 1)
    opt_names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    opt = OptimizerConfig(
        **{k: t.pop(k) for k in list(t) if k in opt_names}, total_steps=t.get("steps", 1000)
    )
    train = TrainSpec(**_fields(TrainSpec, t, "train"), optimizer=opt)

    c = dict(raw["checkpoint"])
    _check_int("checkpoint.save_every", c.get("save_every", 500), 1)
    _check_int("checkpoint.keep", c.get("keep", 3), 1)
    checkpoint = CheckpointSpec(**_fields(CheckpointSpec, c, "checkpoint"))

    lora_cfg = compress.parse_lora(raw.get("lora"))
    prune_cfg = compress.parse_prune(raw.get("prune"))
    if lora_cfg is not None and prune_cfg is not None:
        raise ConfigError(
            "prune and lora cannot be combined: with LoRA only the adapters train, and "
            "pruning masks the trained weights; prune the merged model instead"
        )
    teacher = distill = None
    if "teacher" in raw or "distill" in raw:
        teacher, distill = _parse_distillation(raw)
        if lora_cfg is not None and (model.teacher_layers or lora_cfg.dropout):
            raise ConfigError(
                f"lora.rank={lora_cfg.rank} in distillation trains adapters over the frozen "
                "student in model.model_dir: model.teacher_layers cannot build it, and "
                f"lora.dropout={lora_cfg.dropout} is not applied there (set it to 0)"
            )
    elif model.teacher_layers:
        raise ConfigError("model.teacher_layers needs a teacher: use a distillation config")
    structured_cfg = compress.parse_structured(raw.get("structured"))
    if structured_cfg is not None:
        _check_structured(model, teacher, distill, lora_cfg)
    if teacher is not None and teacher.logits_dir:
        _check_cached_teacher(model, distill, structured_cfg)
    return RunConfig(
        model=model,
        mesh=mesh,
        data=data,
        tokenizer=tokenizer,
        train=train,
        checkpoint=checkpoint,
        raw=raw,
        lora=lora_cfg,
        prune=prune_cfg,
        teacher=teacher,
        distill=distill,
        structured=structured_cfg,
    )


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
    teacher = TeacherSpec(**_fields(TeacherSpec, raw["teacher"], "teacher"))
    if teacher.dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype={teacher.dtype!r}; expected one of {DTYPES}")
    d = dict(raw["distill"])
    on_policy = _parse_on_policy(d.pop("on_policy", None), d, raw["data"].get("seq_len", 2048))
    loss_names = ("kind", "temperature", "alpha", "beta", "top_k")
    loss = DistillLossConfig(**{k: d.pop(k) for k in loss_names if k in d})
    d["on_policy"] = on_policy
    d["features"] = parse_feature_map(d.get("features", ""))
    spec = DistillSpec(**_fields(DistillSpec, d, "distill"), loss=loss)
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
    spec = OnPolicySpec(**_fields(OnPolicySpec, section, "distill.on_policy"))
    if spec.max_new_tokens == 0:
        return None
    for name in ("lmbda", "beta"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"distill.on_policy.{name}={value!r}; expected a number in [0, 1]")
    if not spec.temperature >= 0:
        raise ConfigError(
            f"distill.on_policy.temperature={spec.temperature!r}; expected >= 0 (0: greedy)"
        )
    _check_int("distill.on_policy.min_prompt", spec.min_prompt, 1)
    _check_int("distill.on_policy.max_new_tokens", spec.max_new_tokens, 1)
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
