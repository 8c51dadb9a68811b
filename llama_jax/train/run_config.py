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
from llama_jax.nn import LoraConfig
from llama_jax.train.optim import OptimizerConfig

DTYPES = ("float32", "bfloat16", "float16")
# Sections a plain training config has not: `distill.DistillConfig` reads them.
DISTILL_SECTIONS = ("teacher", "distill", "structured")
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
    """`profile_steps` "A:B" traces steps A to B (1-based, as the progress line counts
    them) with jax.profiler into <workdir>/profile; "" traces nothing."""

    steps: int = 1000
    grad_accum: int = 1
    loss_chunk: int = 1024
    log_every: int = 10
    seed: int = 0
    profile_steps: str = ""
    optimizer: OptimizerConfig = OptimizerConfig()

    def profile_range(self) -> tuple[int, int] | None:
        """(first, last) step to trace, or None."""
        return parse_profile_steps(self.profile_steps, self.steps)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    save_every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A checked run configuration (configs/base.py layout). `lora` and `prune` are None
    when that feature is off; `tokenizer` is data.tokenizer. Distillation configs add
    their sections in a subclass (`distill.DistillConfig`)."""

    model: ModelSpec
    mesh: MeshSpec
    data: DataConfig
    tokenizer: str
    train: TrainSpec
    checkpoint: CheckpointSpec
    raw: Mapping[str, Any]
    lora: LoraConfig | None = None
    prune: compress.PruneConfig | None = None

    @classmethod
    def of(cls, cfg) -> RunConfig:
        """`cfg` checked and typed: a RunConfig is returned as it is; a ConfigDict or a
        nested mapping is converted. Raises ConfigError or DataError naming the field."""
        if isinstance(cfg, RunConfig):
            return cfg
        raw = plain_config(cfg)
        refused = [name for name in DISTILL_SECTIONS if name in raw]
        if refused:
            raise ConfigError(
                f"the config has distillation sections {refused}: it runs as distillation "
                "(launch.distill; distill.typed_config types it)"
            )
        if raw.get("model", {}).get("teacher_layers"):
            raise ConfigError("model.teacher_layers needs a teacher: use a distillation config")
        return cls(**parse_sections(raw))

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)


def plain_config(cfg) -> dict[str, Any]:
    """A config (ConfigDict or nested mapping) as nested dicts."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: plain_config(v) for k, v in cfg.items()}
    return cfg


def fields_of(cls, section: Mapping[str, Any], where: str, **extra) -> dict[str, Any]:
    """The entries of `section` that are fields of `cls`; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names - set(extra))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    return {k: v for k, v in section.items() if k in names} | extra


def check_int(where: str, value, low: int) -> None:
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


def parse_profile_steps(spec: str, steps: int) -> tuple[int, int] | None:
    """`train.profile_steps` "A:B" as (A, B), checked: 1 <= A <= B <= train.steps."""
    if not spec:
        return None
    first, sep, last = str(spec).partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = int(first), int(last)
    except ValueError:
        raise ConfigError(
            f"train.profile_steps={spec!r}; expected FIRST:LAST step numbers, e.g. '10:13'"
        ) from None
    if not 1 <= a <= b <= steps:
        raise ConfigError(
            f"train.profile_steps={spec!r}; expected 1 <= {a} <= {b} <= train.steps={steps}"
        )
    return a, b


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


def parse_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The RunConfig fields of `raw`'s sections (model, mesh, data, train, checkpoint,
    lora, prune), each checked."""
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
    model = ModelSpec(**fields_of(ModelSpec, m, "model"))

    mesh_raw = dict(raw["mesh"])
    mesh_raw["rules"] = parse_rules(mesh_raw.get("rules", ""))
    mesh = MeshSpec(**fields_of(MeshSpec, mesh_raw, "mesh"))

    d = dict(raw["data"])
    tokenizer = d.pop("tokenizer", "")
    data = DataConfig(**fields_of(DataConfig, d, "data"))

    t = dict(raw["train"])
    check_int("train.steps", t.get("steps", 1000), 1)
    check_int("train.log_every", t.get("log_every", 10), 1)
    check_int("train.grad_accum", t.get("grad_accum", 1), 1)
    check_int("train.loss_chunk", t.get("loss_chunk", 1024), 1)
    opt_names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    opt = OptimizerConfig(
        **{k: t.pop(k) for k in list(t) if k in opt_names}, total_steps=t.get("steps", 1000)
    )
    train = TrainSpec(**fields_of(TrainSpec, t, "train"), optimizer=opt)
    train.profile_range()

    c = dict(raw["checkpoint"])
    check_int("checkpoint.save_every", c.get("save_every", 500), 1)
    check_int("checkpoint.keep", c.get("keep", 3), 1)
    checkpoint = CheckpointSpec(**fields_of(CheckpointSpec, c, "checkpoint"))

    lora_cfg = compress.parse_lora(raw.get("lora"))
    prune_cfg = compress.parse_prune(raw.get("prune"))
    if lora_cfg is not None and prune_cfg is not None:
        raise ConfigError(
            "prune and lora cannot be combined: with LoRA only the adapters train, and "
            "pruning masks the trained weights; prune the merged model instead"
        )
    return dict(
        model=model,
        mesh=mesh,
        data=data,
        tokenizer=tokenizer,
        train=train,
        checkpoint=checkpoint,
        raw=raw,
        lora=lora_cfg,
        prune=prune_cfg,
    )
