"""Perplexity of a text or JSONL file (`read_documents`, `eval_perplexity`).

Documents are read as training data is (`data.py`: text split at blank lines, or a JSONL
field) and tokenized as BOS + text + EOS (`add_bos`, `add_eos`). Every token after a
document's first is predicted exactly once, from its own document only. A document longer
than `seq_len` + 1 tokens is cut into consecutive windows of `seq_len` predictions, and
each window sees only its own tokens, so like any fixed-window perplexity the figure
depends on `seq_len`. Windows are packed several to a row, each its own segment
(attention never crosses segments and positions restart in each), which scores exactly
what one window per row (`pack=False`) scores, with less padding. The loss is the float32
chunked cross-entropy of training; perplexity = exp(summed loss / tokens).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from llama_jax import data, sharding
from llama_jax.errors import DataError
from llama_jax.evaluate import ENCODE_CHUNK, Progress, check_ids, on_mesh, setup_mesh
from llama_jax.losses import make_eval_step

FORMATS = ("text", "jsonl")


# Cached so that evaluating model after model of one architecture compiles once.
_eval_step = functools.lru_cache(maxsize=8)(make_eval_step)


def _windows(ids: Sequence[int], seq_len: int):
    """(inputs, targets) pieces that predict ids[1:] in windows of at most seq_len."""
    for s in range(0, len(ids) - 1, seq_len):
        e = min(s + seq_len, len(ids) - 1)
        yield ids[s:e], ids[s + 1 : e + 1]


def _pack_windows(encoded: Sequence[Sequence[int]], seq_len: int, pack: bool):
    """Rows of int32 [R, T] tokens, segment_ids, targets and loss_mask holding every
    document's windows, each a segment of its own; a window goes to the current row
    while it fits, else it starts the next one (`pack=False`: always the next one)."""
    placed = []  # (row, offset, inputs, targets)
    row, used = -1, seq_len
    for ids in encoded:
        for inputs, targets in _windows(ids, seq_len):
            if not pack or used + len(inputs) > seq_len:
                row, used = row + 1, 0
            placed.append((row, used, inputs, targets))
            used += len(inputs)
    shape = (row + 1, seq_len)
    out = {name: np.zeros(shape, np.int32) for name in data.FIELDS}
    segment = np.zeros(shape[0], np.int32)
    for r, at, inputs, targets in placed:
        segment[r] += 1
        end = at + len(inputs)
        out["tokens"][r, at:end] = inputs
        out["targets"][r, at:end] = targets
        out["segment_ids"][r, at:end] = segment[r]
        out["loss_mask"][r, at:end] = 1
    return out


def read_documents(path, *, format: str | None = None, field: str = "text") -> list[str]:
    """The documents of a text or JSONL file, read as training data is (`data.py`).

    format: "text" (documents separated by blank lines) or "jsonl" (default: "jsonl" for
    .jsonl/.json files, else "text"); field: the JSONL key holding each document.
    """
    path = epath.Path(path)
    if format is None:
        format = "jsonl" if path.suffix in (".jsonl", ".json") else "text"
    if format not in FORMATS:
        raise DataError(f"data format {format!r} is unknown; expected one of {FORMATS}")
    if format == "jsonl" and not field:
        raise DataError("field is empty; expected the JSONL key that holds each document")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    docs = data.read_text(path) if format == "text" else data.read_jsonl(path, field)
    if not docs:
        raise DataError(f"data file {path} holds no documents")
    return docs


def eval_perplexity(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    add_bos: bool = True,
    add_eos: bool = True,
    pack: bool = True,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    loss_chunk: int = 512,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of documents (see the module docstring; `read_documents` reads a file).

    seq_len: T, predictions per window; batch_size: rows per step, a multiple of the
    mesh's batch shards. mesh: default the one the model's parameters are on.
    progress(done, total) counts rows. Returns {"perplexity", "loss" (mean nats per
    predicted token), "tokens" (predicted), "documents", "rows", "seq_len"};
    perplexity = exp(loss).
    """
    if isinstance(documents, str):
        raise TypeError("documents is one string; pass a list (read_documents(path) reads one)")
    mesh = setup_mesh(model, tokenizer, seq_len, batch_size, mesh, rules)
    encoded = []
    for i in range(0, len(documents), ENCODE_CHUNK):
        encoded += tokenizer.encode_batch(
            documents[i : i + ENCODE_CHUNK], add_bos=add_bos, add_eos=add_eos
        )
    tokens = sum(max(len(ids) - 1, 0) for ids in encoded)
    if tokens == 0:
        raise DataError(f"the {len(documents)} documents have no tokens to predict")
    check_ids(encoded, model.config.vocab_size, "the documents")
    rows = _pack_windows(encoded, seq_len, pack)
    num_rows = len(rows["tokens"])
    graphdef, state = nnx.split(model)
    step = _eval_step(graphdef, loss_chunk)
    total, pending = 0.0, None
    for start in range(0, num_rows, batch_size):
        host = {}
        for name, a in rows.items():
            host[name] = np.zeros((batch_size, seq_len), np.int32)
            part = a[start : start + batch_size]
            host[name][: len(part)] = part
        with sharding.activation_sharding(mesh, rules):
            out = step(state, on_mesh(host, mesh, rules))
        # Fetching the previous batch's sum after dispatching this one keeps the device busy.
        if pending is not None:
            total += float(jax.device_get(pending[0]))
        pending = out
        if progress is not None:
            progress(min(start + batch_size, num_rows), num_rows)
    total += float(jax.device_get(pending[0]))
    loss = total / tokens
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "tokens": tokens,
        "documents": len(documents),
        "rows": num_rows,
        "seq_len": seq_len,
    }
