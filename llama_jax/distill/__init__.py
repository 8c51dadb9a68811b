"""Distillation: the recipe and its step (live or cached teacher, hidden states), on-policy
samples, the teacher logit cache."""

from llama_jax.distill.cache import LogitCache
from llama_jax.distill.cache_writer import write_teacher_logits
from llama_jax.distill.recipe import Distillation, perplexity, run
from llama_jax.distill.records import Layout, decode
from llama_jax.distill.step import linear_schedule, make_distill_step

__all__ = [
    "decode",
    "Distillation",
    "Layout",
    "linear_schedule",
    "LogitCache",
    "make_distill_step",
    "perplexity",
    "run",
    "write_teacher_logits",
]
