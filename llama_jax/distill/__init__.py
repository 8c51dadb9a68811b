"""Distillation: its config, the recipe and its step (live or cached teacher, hidden
states), on-policy samples, the teacher logit cache; and the recipe any config asks for."""

from llama_jax.distill.cache import LogitCache
from llama_jax.distill.cache_writer import write_teacher_logits
from llama_jax.distill.recipe import Distillation, heldout_perplexity, recipe_for, run
from llama_jax.distill.records import Layout, decode
from llama_jax.distill.spec import (
    DistillConfig,
    DistillSpec,
    OnPolicySpec,
    TeacherSpec,
    is_distillation,
    typed_config,
)
from llama_jax.distill.step import linear_schedule, make_distill_step

__all__ = [
    "DistillConfig",
    "DistillSpec",
    "Distillation",
    "Layout",
    "LogitCache",
    "OnPolicySpec",
    "TeacherSpec",
    "decode",
    "heldout_perplexity",
    "is_distillation",
    "linear_schedule",
    "make_distill_step",
    "recipe_for",
    "run",
    "typed_config",
    "write_teacher_logits",
]
