"""Data: tokenizers, JSON Lines files, token stores (a corpus tokenized, shuffled and packed
once), and the training-data pipeline (packed rows, per-host and global batches, mixtures)."""

from llama_jax.data.corpus import FORMATS as CORPUS_FORMATS
from llama_jax.data.jsonl import records, strings
from llama_jax.data.mixture import parse_sources
from llama_jax.data.packing import PACK_MODES, packer
from llama_jax.data.pipeline import (
    FIELDS,
    FORMATS,
    DataConfig,
    DataIterator,
    read_jsonl,
    read_text,
    row_fields,
)
from llama_jax.data.prefetch import Prefetcher
from llama_jax.data.prepare import prepare_store
from llama_jax.data.store import TokenStore, check_not_unfinished, is_store, tokenizer_fingerprint
from llama_jax.data.tokenizer import Tokenizer

__all__ = [
    "CORPUS_FORMATS",
    "check_not_unfinished",
    "DataConfig",
    "DataIterator",
    "FIELDS",
    "FORMATS",
    "PACK_MODES",
    "packer",
    "Prefetcher",
    "is_store",
    "parse_sources",
    "prepare_store",
    "read_jsonl",
    "read_text",
    "records",
    "row_fields",
    "strings",
    "TokenStore",
    "Tokenizer",
    "tokenizer_fingerprint",
]
