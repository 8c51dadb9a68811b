"""Perplexity of a text or JSONL file (`read_documents`, `eval_perplexity`), as the tools
people compare against compute it.

A text file is one document by default: the whole file (newlines as Python's text mode
reads them), tokenized as the tokenizer does by default, that is with BOS exactly where
transformers' tokenizer adds it, and no EOS. `split="blank_lines"` makes each block between
blank lines a document, and every line of a JSONL file is one. Each document is scored on
its own and its first token is context only (it is BOS, or what transformers' `labels =
input_ids` leaves unscored too); every later token is predicted exactly once.

Windows of `seq_len` (T) tokens, so that each figure is its reference's for the same
settings:
- without `stride`, lm-evaluation-harness's rolling log-likelihood (`loglikelihood_rolling`
  with max_length T): the predicted spans are disjoint; the first window feeds T tokens and
  predicts the T after the document's first, every later one predicts the next T (fewer at
  the end) from the T tokens before its last prediction.
- with `stride` S (1 <= S < T), Hugging Face's strided recipe ("Perplexity of
  fixed-length models", max_length T): windows of T tokens start every S tokens, and each
  scores the tokens no earlier window scored (S of them, except the first window's T - 1
  and the last one's), with the rest of the window as context; the last window ends at the
  document's end.

Windows are packed several to a row, each its own segment (attention never crosses
segments and positions restart in each), which scores exactly what one window per row
(`pack=False`) scores, with less padding. The loss is the float32 chunked cross-entropy of
training. perplexity = exp(summed loss / predicted tokens); like lm-evaluation-harness,
`bits_per_byte` = summed loss / UTF-8 bytes / ln 2, `byte_perplexity` = exp(summed loss /
bytes) and `word_perplexity` = exp(summed loss / words), where a document's words are
`len(re.split(r"\\s+", text))`: these do not depend on the tokenizer, so models with
different vocabularies compare on them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from llama_jax import data, sharding
from llama_jax.errors import DataError
from llama_jax.evals.evaluate import ENCODE_CHUNK, Progress, check_ids, on_mesh, setup_mesh
from llama_jax.nn import make_eval_step

FORMATS = ("text", "jsonl")
SPLITS = ("none", "blank_lines")

# Cached so that evaluating model after model of one architecture compiles once.
_eval_step = functools.lru_cache(maxsize=8)(make_eval_step)


def data_format(path, format: str | None = None) -> str:
    """format, or when None the one the file name says: "jsonl" for .jsonl/.json, else
    "text"."""
    if format is None:
        return "jsonl" if epath.Path(path).suffix in (".jsonl", ".json") else "text"
    if format not in FORMATS:
        raise DataError(f"data format {format!r} is unknown; expected one of {FORMATS}")
    return format


def read_documents(
    path, *, format: str | None = None, field: str = "text", split: str | None = None
) -> list[str]:
    """The documents of a text or JSONL file.

    format: "text" or "jsonl" (default: "jsonl" for .jsonl/.json files, else "text").
    split (text only): "none" (default), the whole file is one document; "blank_lines",
    each block between blank lines is one (as training data is read, `data.py`).
    field: the JSONL key holding each document.
    """
    path = epath.Path(path)
    format = data_format(path, format)
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; expected one of {SPLITS}")
    if format == "jsonl" and split is not None:
        raise DataError(
            f"split={split!r} applies to text files; every line of the JSONL file {path} is "
            "already one document"
        )
    if format == "jsonl" and not field:
        raise DataError("field is empty; expected the JSONL key that holds each document")
    data.check_not_unfinished(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if format == "jsonl":
        docs = data.read_jsonl(path, field)
    elif split == "blank_lines":
        docs = data.read_text(path)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text: {e}") from e
        # What open(path).read() gives, the usual way a text reaches transformers.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        docs = [text] if text.strip() else []
    if not docs:
        raise DataError(f"data file {path} holds no text")
    return docs


def check_stride(stride: int | None, seq_len: int) -> None:
    """Raises DataError unless stride is None (disjoint windows) or an integer in
    [1, seq_len): a stride of seq_len or more would leave tokens unscored."""
    if stride is None:
        return
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < seq_len:
        raise DataError(
            f"stride={stride!r}; expected an integer from 1 to seq_len - 1 = {seq_len - 1} "
            "(or no stride: disjoint windows)"
        )


@dataclasses.dataclass(frozen=True)
class _Window:
    """Inputs ids[start:end] of document doc predict ids[start + 1:end + 1]; the last
    `scored` predictions count."""

    doc: int
    start: int
    end: int
    scored: int


def _windows(doc: int, n: int, seq_len: int, stride: int | None):
    """The windows of a document of n tokens (see the module docstring)."""
    if n < 2:
        return
    if stride is None:
        done = min(seq_len, n - 1)  # predictions made so far: ids[1:done + 1]
        yield _Window(doc, 0, done, done)
        while done < n - 1:
            end = min(done + seq_len, n - 1)
            yield _Window(doc, max(0, end - seq_len), end, end - done)
            done = end
        return
    scored_to = 0  # ids[:scored_to] need no more predictions
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        # Tokens ids[begin:end]: the first is context only, as in a window of transformers.
        yield _Window(doc, begin, end - 1, end - max(scored_to, begin + 1))
        scored_to = end
        if end == n:
            return


def _place(windows, seq_len: int, pack: bool) -> list[tuple[int, int, _Window]]:
    """(row, offset, window) of every window: a window goes to the current row while it
    fits, else it starts the next one (`pack=False`: always the next one)."""
    placed, row, used = [], -1, seq_len
    for w in windows:
        length = w.end - w.start
        if not pack or used + length > seq_len:
            row, used = row + 1, 0
        placed.append((row, used, w))
        used += length
    return placed


def _fill_rows(placed, encoded, first_row: int, num_rows: int, seq_len: int):
    """int32 [num_rows, T] tokens, segment_ids, targets and loss_mask of rows first_row...
    from their placed windows (each window a segment of its own)."""
    out = {name: np.zeros((num_rows, seq_len), np.int32) for name in data.FIELDS}
    segment = np.zeros(num_rows, np.int32)
    for row, at, w in placed:
        r = row - first_row
        ids = encoded[w.doc]
        end = at + w.end - w.start
        segment[r] += 1
        out["tokens"][r, at:end] = ids[w.start : w.end]
        out["targets"][r, at:end] = ids[w.start + 1 : w.end + 1]
        out["segment_ids"][r, at:end] = segment[r]
        out["loss_mask"][r, end - w.scored : end] = 1
    return out


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding starts with BOS (as transformers' does)."""
    return tokenizer.bos_id is not None and tokenizer.encode("")[:1] == [tokenizer.bos_id]


def eval_perplexity(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    seq_len: int,
    batch_size: int,
    stride: int | None = None,
    add_bos: bool | None = None,
    add_eos: bool = False,
    pack: bool = True,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    loss_chunk: int = 512,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of documents (see the module docstring; `read_documents` reads a file).

    seq_len: T, tokens per window; stride: S, where windows start (default: disjoint
    windows). batch_size: rows per step, a multiple of the mesh's batch
    shards. add_bos: default the tokenizer's; add_eos: append EOS to every document. mesh:
    default the one the model's parameters are on. progress(done, total) counts rows.

    Returns {"perplexity", "loss" (mean nats per predicted token), "tokens" (predicted),
    "bits_per_byte", "byte_perplexity", "word_perplexity", "bytes", "words", "documents",
    "windows", "rows", "seq_len", "stride" (None: disjoint windows), "add_bos", "add_eos"};
    add_bos is the resolved value.
    """
    if isinstance(documents, str):
        raise TypeError("documents is one string; pass a list (read_documents(path) reads one)")
    mesh = setup_mesh(model, tokenizer, seq_len, batch_size, mesh, rules)
    check_stride(stride, seq_len)
    add_bos = _adds_bos(tokenizer) if add_bos is None else bool(add_bos)
    encoded = []
    for i in range(0, len(documents), ENCODE_CHUNK):
        chunk = tokenizer.encode_batch(
            documents[i : i + ENCODE_CHUNK], add_bos=add_bos, add_eos=add_eos
        )
        check_ids(chunk, model.config.vocab_size, "the documents")
        encoded += [np.asarray(ids, np.int32) for ids in chunk]
    windows = [w for d, ids in enumerate(encoded) for w in _windows(d, len(ids), seq_len, stride)]
    tokens = sum(w.scored for w in windows)
    if tokens == 0:
        raise DataError(
            f"the {len(documents)} documents have no tokens to predict (each needs at least "
            "two tokens)"
        )
    placed = _place(windows, seq_len, pack)
    num_rows = placed[-1][0] + 1

    def batches():
        # Rows are built a batch at a time: a small stride makes many of them.
        at = 0
        for start in range(0, num_rows, batch_size):
            first = at
            while at < len(placed) and placed[at][0] < start + batch_size:
                at += 1
            yield _fill_rows(placed[first:at], encoded, start, batch_size, seq_len)

    total = _summed_loss(model, batches(), num_rows, batch_size, mesh, rules, loss_chunk, progress)
    num_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    return {
        "perplexity": math.exp(total / tokens),
        "loss": total / tokens,
        "tokens": tokens,
        "bits_per_byte": total / num_bytes / math.log(2),
        "byte_perplexity": math.exp(total / num_bytes),
        "word_perplexity": math.exp(total / words),
        "bytes": num_bytes,
        "words": words,
        "documents": len(documents),
        "windows": len(windows),
        "rows": num_rows,
        "seq_len": seq_len,
        "stride": stride,
        "add_bos": add_bos,
        "add_eos": add_eos,
    }


def store_perplexity(
    model,
    tokenizer,
    path,
    *,
    batch_size: int,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    loss_chunk: int = 512,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity over every row of a token store (`launch.prepare_data`), in order:
    each token predicts the next one of its own document within the row (a document cut
    across rows is scored in its pieces, its first token of each piece context only).
    tokenizer: the model's, checked against the model's vocabulary; the store's vocabulary
    must fit it too.

    Returns {"perplexity", "loss" (mean nats per predicted token), "tokens" (predicted),
    "rows", "seq_len", "documents"} (the store's counts)."""
    store = data.TokenStore(path)
    seq_len, num_rows = store.manifest.seq_len, store.num_rows
    store.check(
        seq_len=seq_len,
        vocab_size=model.config.vocab_size,
        tokenizer_path=None if tokenizer is None else tokenizer.path,
    )
    mesh = setup_mesh(model, tokenizer, seq_len, batch_size, mesh, rules)
    counted = []

    def batches():
        for start in range(0, num_rows, batch_size):
            rows = np.arange(start, min(start + batch_size, num_rows))
            ids, segments = store.read(rows)
            # The last batch is padded with empty rows (segment 0: nothing scored).
            pad = batch_size - len(rows)
            ids = np.pad(ids.astype(np.int32), ((0, pad), (0, 0)))
            segments = np.pad(segments.astype(np.int32), ((0, pad), (0, 0)))
            host = data.row_fields(ids, segments)
            counted.append(int(host["loss_mask"].sum()))
            yield host

    total = _summed_loss(model, batches(), num_rows, batch_size, mesh, rules, loss_chunk, progress)
    tokens = sum(counted)
    if tokens == 0:
        raise DataError(f"{path} has no tokens to predict")
    return {
        "perplexity": math.exp(total / tokens),
        "loss": total / tokens,
        "tokens": tokens,
        "rows": num_rows,
        "seq_len": seq_len,
        "documents": int(store.manifest.raw.get("documents", 0)),
    }


def _summed_loss(model, batches, num_rows, batch_size, mesh, rules, loss_chunk, progress):
    """The summed token loss of `batches` (host dicts of `data.FIELDS`, `batch_size`
    rows each, `num_rows` in all) on `mesh`; progress(done, total) counts rows."""
    graphdef, state = nnx.split(model)
    step = _eval_step(graphdef, loss_chunk)
    total, pending = 0.0, None
    for i, host in enumerate(batches):
        with sharding.activation_sharding(mesh, rules):
            out = step(state, on_mesh(host, mesh, rules))
        # Fetching the previous batch's sum after dispatching this one keeps the device busy.
        if pending is not None:
            total += float(jax.device_get(pending[0]))
        pending = out
        if progress is not None:
            progress(min((i + 1) * batch_size, num_rows), num_rows)
    if pending is not None:
        total += float(jax.device_get(pending[0]))
    return total


def describe(result: dict[str, Any], split: str) -> str:
    """One line saying how a perplexity `result` split, tokenized and windowed its text.
    split: "none", "blank_lines" or "jsonl"."""
    docs = result["documents"]
    how = {
        "none": "the whole file as one document",
        "blank_lines": f"{docs} documents split at blank lines",
        "jsonl": f"{docs} JSONL documents",
    }[split]
    bos = "with BOS" if result["add_bos"] else "without BOS"
    eos = "with EOS" if result["add_eos"] else "no EOS"
    if result["stride"] is None:
        windows = (
            f"disjoint windows of {result['seq_len']} tokens (lm-evaluation-harness's rolling "
            "log-likelihood)"
        )
    else:
        windows = (
            f"windows of {result['seq_len']} tokens every {result['stride']} tokens (Hugging "
            "Face's strided perplexity)"
        )
    return (
        f"{how}; tokenized {bos}, {eos}; {windows} ({result['windows']} windows, "
        f"{result['tokens']} tokens predicted)"
    )
