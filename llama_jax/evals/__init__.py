"""Evaluation: perplexity, task files (multiple choice, generation), text metrics, and
several models compared."""

from llama_jax.evals.compare import Suite, check_report, evaluate_dirs, markdown, write_report
from llama_jax.evals.perplexity import data_format, read_documents, store_perplexity
from llama_jax.evals.tasks import load_task

__all__ = [
    "store_perplexity",
    "check_report",
    "data_format",
    "evaluate_dirs",
    "load_task",
    "markdown",
    "read_documents",
    "Suite",
    "write_report",
]
