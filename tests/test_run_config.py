"""A run's config is typed and checked once, before anything runs."""

import dataclasses
import importlib
import pathlib

import ml_collections
import pytest

from configs.base import base_config, distill_config
from llama_jax import sharding
from llama_jax.config import get_preset
from llama_jax.distill.spec import DistillConfig, typed_config
from llama_jax.errors import ConfigError, DataError
from llama_jax.train import run_config
from llama_jax.train.run_config import RunConfig

CONFIGS = sorted(
    p.stem
    for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem not in ("__init__", "base")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_parses(name):
    cfg = typed_config(importlib.import_module(f"configs.{name}").get_config())
    assert cfg.train.optimizer.total_steps == cfg.train.steps
    assert isinstance(cfg, DistillConfig) == name.startswith("distill")
    if isinstance(cfg, DistillConfig):
        assert cfg.teacher is not None and cfg.distill is not None
    # The config as written is kept: runs save it and resumes compare against it.
    assert cfg.raw["data"]["seq_len"] == cfg.data.seq_len


def test_overrides_nested_or_as_a_string_give_the_same_model():
    nested, text = base_config(), base_config()
    nested.model.overrides = ml_collections.ConfigDict(dict(num_layers=3, rms_norm_eps=1e-6))
    text.model.overrides = "num_layers=3, rms_norm_eps=1e-6"
    a, b = RunConfig.of(nested), RunConfig.of(text)
    assert a.model.overrides == b.model.overrides == (("num_layers", 3), ("rms_norm_eps", 1e-6))
    tiny = get_preset("tiny")
    assert a.model.preset_config() == dataclasses.replace(tiny, num_layers=3, rms_norm_eps=1e-6)


def test_mesh_rules_nested_or_as_a_string_give_the_same_table():
    nested, text = base_config(), base_config()
    nested.mesh.rules = ml_collections.ConfigDict(dict(vocab="fsdp+tensor", embed=""))
    text.mesh.rules = "vocab=fsdp+tensor,embed="
    a, b = RunConfig.of(nested).mesh.rules_table(), RunConfig.of(text).mesh.rules_table()
    assert a == b
    assert dict(a)["vocab"] == ("fsdp", "tensor") and dict(a)["embed"] is None
    assert dict(a)["mlp"] == dict(sharding.DEFAULT_RULES)["mlp"]


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda c: c.model.update(overrides="num_layers=two"), ConfigError, "num_layers='two'"),
        (lambda c: c.model.update(overrides="rope_scaling=1"), ConfigError, "rope_scaling"),
        (lambda c: c.model.update(overrides={"num_layers": 2.5}), ConfigError, "num_layers"),
        (lambda c: c.model.update(dtype="int8"), ConfigError, "model.dtype='int8'"),
        (
            lambda c: c.model.update(model_dir="/m", overrides="num_layers=2"),
            ConfigError,
            "presets",
        ),
        (lambda c: c.mesh.update(rules="vocab"), ConfigError, "NAME=AXIS"),
        (lambda c: c.mesh.update(rules={"nonsense": "fsdp"}), ConfigError, "nonsense"),
        (lambda c: c.train.update(steps=0), ConfigError, "train.steps=0"),
        (lambda c: c.train.update(grad_accum=0), ConfigError, "train.grad_accum=0"),
        (lambda c: c.train.update(decay="step"), ConfigError, "decay='step'"),
        (lambda c: c.checkpoint.update(keep=0), ConfigError, "checkpoint.keep=0"),
        (lambda c: c.data.update(seq_len=1), DataError, "seq_len=1"),
        (lambda c: c.data.update(format="csv"), DataError, "csv"),
        (lambda c: c.lora.update(rank=-1), ConfigError, "lora.rank=-1"),
        (
            lambda c: c.prune.update(sparsity=0.5) or c.lora.update(rank=4),
            ConfigError,
            "prune and lora",
        ),
        (lambda c: c.train.update(nonsense=1), ConfigError, "nonsense"),
    ],
)
def test_bad_training_configs_are_refused_naming_the_field(edit, error, match):
    cfg = base_config()
    with cfg.unlocked():
        edit(cfg)
    with pytest.raises(error, match=match):
        RunConfig.of(cfg)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.teacher.update(dtype="int4"), "teacher.dtype='int4'"),
        (lambda c: c.distill.update(kind="kl"), "kind='kl'"),
        (lambda c: c.distill.update(eval_batches=0), "eval_batches=0"),
        (lambda c: c.lora.update(rank=8, dropout=0.1), "lora.dropout=0.1"),
    ],
)
def test_bad_distillation_configs_are_refused(edit, match):
    cfg = distill_config()
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        DistillConfig.of(cfg)


def test_a_training_config_type_refuses_distillation_sections():
    with pytest.raises(ConfigError, match=r"distillation sections \['teacher', 'distill'"):
        RunConfig.of(distill_config())
    with pytest.raises(ConfigError, match="'teacher' and 'distill'"):
        DistillConfig.of(base_config())


def test_teacher_layers_need_a_distillation_config():
    cfg = base_config()
    with cfg.unlocked():
        cfg.model.teacher_layers = "0,2"
    with pytest.raises(ConfigError, match="teacher_layers"):
        RunConfig.of(cfg)


def test_a_typed_config_is_frozen_and_passes_through():
    cfg = RunConfig.of(base_config())
    assert RunConfig.of(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3
    assert run_config.apply_overrides(get_preset("tiny"), "num_layers=1").num_layers == 1
