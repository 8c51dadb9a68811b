"""Data: tokenizers, JSON Lines files, and the training-data pipeline (packed rows, per-
host and global batches)."""

from llama_jax.data.jsonl import records, strings
from llama_jax.data.pipeline import FIELDS, FORMATS, DataConfig, DataIterator, read_jsonl, read_text
from llama_jax.data.tokenizer import Tokenizer

__all__ = [
    "DataConfig",
    "DataIterator",
    "FIELDS",
    "FORMATS",
    "read_jsonl",
    "read_text",
    "records",
    "strings",
    "Tokenizer",
]
