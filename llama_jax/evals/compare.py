"""Several model directories scored on the same data and tasks (a teacher, its distilled
student, its pruned and quantized variants), and the table of their results.

`evaluate_dirs` checks every directory (config, tokenizer, lengths) before it reads any
weights, then loads, scores and frees one model at a time, so the peak memory is the
largest model's. `table_row` flattens one model's results into a row: perplexity and bits
per byte of the data, each task's metrics as `<task>/<metric>`, parameters
(`LlamaConfig.num_params`) and bytes on disk (a Hugging Face or converted directory: every
file in it; a training run: its parameters as stored, the optimizer state left out).
`write_report` writes the rows as JSONL, a Markdown table and a PNG bar chart (matplotlib,
an optional dependency, checked by `check_report` before any model runs).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils.epath import backend as epath_backend
from flax import nnx

from llama_jax import formats, nn, paths, sharding, tree
from llama_jax.errors import ConfigError
from llama_jax.evals import evaluate, perplexity
from llama_jax.evals.tasks import Task

REPORT_FORMATS = ("jsonl", "md", "png")
# Columns shown before the task metrics and after them; lower is better for the first two.
LEADING = ("perplexity", "bits_per_byte")
TRAILING = ("parameters", "bytes_on_disk")


@dataclasses.dataclass(frozen=True)
class Suite:
    """What every model is scored on, and how.

    documents: the perplexity data (None: none), read from `data` with `split` ("none",
    "blank_lines" or "jsonl"); or with `split` "store", `data` is a token store whose rows
    are scored (`perplexity.store_perplexity`). The rest are `eval_perplexity`'s and
    `eval_task`'s arguments.
    """

    documents: tuple[str, ...] | None
    data: str | None
    split: str
    tasks: tuple[Task, ...]
    seq_len: int
    batch_size: int
    stride: int | None = None
    add_bos: bool | None = None
    add_eos: bool = False
    num_fewshot: int | None = None
    details: bool = False


def check_dirs(
    model_dirs: Sequence[formats.ModelDir], suite: Suite, mesh, tokenizer: str | None = None
):
    """The tokenizer of each model directory (`tokenizer`, a directory or file, for all of
    them when given), once everything but the weights checks out: the config, the
    tokenizer against the vocabulary, seq_len against max_position_embeddings, the batch
    size against the mesh, the stride, the generation tasks' lengths."""
    tokenizers = []
    for model_dir in model_dirs:
        tok = formats.load_tokenizer(tokenizer or model_dir)
        try:
            evaluate.check_setup(model_dir.config, tok, suite.seq_len, suite.batch_size, mesh)
        except ValueError as e:
            raise type(e)(f"{model_dir}: {e}") from e
        tokenizers.append(tok)
    perplexity.check_stride(suite.stride, suite.seq_len)
    for task in suite.tasks:
        evaluate.check_task(task, suite.seq_len)
    return tokenizers


def evaluate_model(
    model,
    tokenizer,
    suite: Suite,
    *,
    mesh=None,
    progress: Callable[[str], evaluate.Progress] | None = None,
) -> list[dict[str, Any]]:
    """The results of one model: the perplexity of the documents (with "data", "split" and
    "method", a line saying how the text was split, tokenized and windowed), then one
    result per task. progress(what) gives the progress callback of each part."""
    results = []
    if suite.split == "store":
        ppl = perplexity.store_perplexity(
            model,
            tokenizer,
            suite.data,
            batch_size=suite.batch_size,
            mesh=mesh,
            progress=progress("perplexity rows") if progress else None,
        )
        method = (
            f"the token store's {ppl['rows']} packed rows of {ppl['seq_len']} tokens in order; "
            f"each token predicts the next of its own document ({ppl['tokens']} predicted)"
        )
        results.append({"data": suite.data, "split": "store", **ppl, "method": method})
    if suite.documents is not None:
        ppl = perplexity.eval_perplexity(
            model,
            tokenizer,
            list(suite.documents),
            seq_len=suite.seq_len,
            batch_size=suite.batch_size,
            stride=suite.stride,
            add_bos=suite.add_bos,
            add_eos=suite.add_eos,
            mesh=mesh,
            progress=progress("perplexity rows") if progress else None,
        )
        method = perplexity.describe(ppl, suite.split)
        results.append({"data": suite.data, "split": suite.split, **ppl, "method": method})
    for task in suite.tasks:
        results.append(
            evaluate.eval_task(
                model,
                tokenizer,
                task,
                num_fewshot=suite.num_fewshot,
                max_len=suite.seq_len,
                batch_size=suite.batch_size,
                add_bos=suite.add_bos,
                mesh=mesh,
                details=suite.details,
                progress=progress(task.spec.name) if progress else None,
            )
        )
    return results


def free(model) -> None:
    """Deletes the model's parameter arrays now, rather than whenever the last reference to
    them goes."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def evaluate_dirs(
    paths: Sequence,
    suite: Suite,
    *,
    mesh,
    dtype=jnp.bfloat16,
    tokenizer: str | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
    progress: Callable[[str], evaluate.Progress] | None = None,
) -> list[dict[str, Any]]:
    """Scores each model directory (a path or a ModelDir) in turn (see the module
    docstring) and returns one `table_row` per directory. Every result is also passed to
    on_result(path, result) as soon as it exists, with "model": path added."""
    model_dirs = [formats.ModelDir.open(p) for p in paths]
    tokenizers = check_dirs(model_dirs, suite, mesh, tokenizer)
    rows = []
    for model_dir, tok in zip(model_dirs, tokenizers, strict=True):
        path = model_dir.given
        facts = model_facts(model_dir)
        model = model_dir.load(dtype=dtype, mesh=mesh)
        try:
            part = progress
            if progress is not None and len(paths) > 1:
                part = lambda what, path=path: progress(f"{path}: {what}")
            results = evaluate_model(model, tok, suite, mesh=mesh, progress=part)
            results = [{"model": path, **r} for r in results]
        finally:
            free(model)
            del model
            gc.collect()
        if on_result is not None:
            for result in results:
                on_result(path, result)
        rows.append(table_row(path, results, facts))
    return rows


def disk_bytes(model_dir: formats.ModelDir) -> int:
    """Bytes a model takes on disk: every file of a Hugging Face or converted directory; the
    stored parameters of a training run (its checkpoints also hold optimizer state)."""
    if model_dir.kind == "run":
        dtypes = model_dir.stored_dtypes
        _, abstract = nn.abstract_params(
            model_dir.config, sharding.create_mesh(devices=jax.devices()[:1])
        )
        shapes = {k: v.shape for k, v in tree.flatten(abstract).items()}
        return sum(int(np.prod(shapes[k])) * np.dtype(dt).itemsize for k, dt in dtypes.items())
    where = str(model_dir.path)
    if "://" in where:
        # (epath's walk drops the gs:// of the directories it yields.)
        return int(epath_backend.fsspec_backend.fs(where).du(where))
    total = 0
    for root, _, files in model_dir.path.walk():
        total += sum((root / f).stat().length for f in files)
    return total


def model_facts(model_dir) -> dict[str, int]:
    """{"parameters", "bytes_on_disk"} of a model directory (a path or a ModelDir)."""
    model_dir = formats.ModelDir.open(model_dir)
    return {
        "parameters": model_dir.config.num_params(),
        "bytes_on_disk": disk_bytes(model_dir),
    }


def table_row(path: str, results: Sequence[dict[str, Any]], facts: dict[str, int]):
    """{"model": path, "perplexity", "bits_per_byte", "<task>/<metric>"..., "parameters",
    "bytes_on_disk"} of one model's results (standard errors left out)."""
    row: dict[str, Any] = {"model": path}
    for result in results:
        if "perplexity" in result:
            row.update({k: result[k] for k in LEADING if k in result})
        else:
            for name, value in result["metrics"].items():
                if not name.endswith("_stderr"):
                    row[f"{result['task']}/{name}"] = value
    return row | facts


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: model, perplexity and bits per byte, the task metrics in the
    order they first appear, parameters and bytes on disk."""
    middle = []
    for row in rows:
        middle += [k for k in row if k not in ("model", *LEADING, *TRAILING) and k not in middle]
    present = {k for row in rows for k in row}
    return ["model", *[k for k in LEADING if k in present], *middle, *TRAILING]


def _number(value, column: str) -> str:
    if value is None:
        return "-"
    if column == "parameters":
        return f"{value / 1e6:.2f}M"
    if column == "bytes_on_disk":
        return f"{value / 1e6:.2f} MB"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table, one row per model."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1))]
    lines[-1] += "|"
    for row in rows:
        cells = [str(row["model"])] + [_number(row.get(c), c) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _labels(paths: Sequence[str]) -> list[str]:
    """Short names for the chart: each directory's last component, or the whole path where
    two would read the same."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths, strict=True)]


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "the PNG chart needs matplotlib (pip install matplotlib), or leave png out of "
            "the report formats"
        ) from e


def check_report(prefix: str, formats: Sequence[str]) -> None:
    """Raises ConfigError unless the report can be written: known formats, an existing
    directory, matplotlib installed when a PNG is asked for."""
    unknown = sorted(set(formats) - set(REPORT_FORMATS))
    if unknown or not formats:
        raise ConfigError(
            f"report formats {list(formats)}; expected some of {list(REPORT_FORMATS)}"
        )
    for fmt in formats:
        paths.check_output_file(f"{prefix}.{fmt}", flag="--report")
    if "png" in formats:
        _import_matplotlib()


def _bar_chart(rows: Sequence[dict[str, Any]], path: str) -> None:
    """One bar chart per column, a bar per model."""
    _import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = [c for c in columns(rows)[1:] if any(row.get(c) is not None for row in rows)]
    labels = _labels([row["model"] for row in rows])
    ncols = min(3, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    # A Figure without pyplot: no global backend state is touched.
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for i, col in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = [row.get(col) if row.get(col) is not None else math.nan for row in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.bar_label(bars, labels=[_number(v, col) for v in values], fontsize=7)
        better = " (lower is better)" if col in LEADING else ""
        ax.set_title(col + better, fontsize=9)
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
        top = max((v for v in values if not math.isnan(v)), default=0.0)
        if min((v for v in values if not math.isnan(v)), default=0.0) >= 0:
            # Every figure here is a count, a rate or a score from 0 up.
            ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    fig.savefig(path, dpi=110, format="png")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    # Written whole under a temporary name, then renamed: never half a file.
    tmp = f"{path}.tmp.{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_report(
    rows: Sequence[dict[str, Any]], prefix: str, formats: Sequence[str] = REPORT_FORMATS
) -> list[str]:
    """Writes prefix.jsonl (one row per model), prefix.md and prefix.png (the formats asked
    for); returns the paths written."""
    check_report(prefix, formats)
    written = []

    def text(content: str):
        def write(tmp: str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)

        return write

    if "jsonl" in formats:
        written.append(f"{prefix}.jsonl")
        _atomic_write(written[-1], text("".join(json.dumps(r) + "\n" for r in rows)))
    if "md" in formats:
        written.append(f"{prefix}.md")
        _atomic_write(written[-1], text(markdown(rows)))
    if "png" in formats:
        written.append(f"{prefix}.png")
        _atomic_write(written[-1], lambda tmp: _bar_chart(rows, tmp))
    return written
