"""A generation task's metrics: the `metrics` entries of its spec (`parse_metric`) and the
scoring of its predictions (`score_generations`), plus the mean and standard error every
per-example metric is reported with (`summarize`). The metrics themselves are in
`text_metrics`.

Exact match and ROUGE (F1, in [0, 1]) score each prediction against its best reference and
are averaged over examples, with the standard error of the mean (`<name>_stderr`); BLEU and
chrF (0 to 100) are corpus scores over all examples and all of each one's references, as
sacrebleu.corpus_bleu / corpus_chrf compute them, with a bootstrap standard error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.errors import ConfigError, DataError
from llama_jax.evals import text_metrics

CORPUS_METRICS = ("bleu", "chrf", "chrf++")
METRICS = ("exact_match", *text_metrics.ROUGE_TYPES, *CORPUS_METRICS)
DEFAULT_METRICS = ("exact_match", *text_metrics.ROUGE_TYPES)
# Each metric's options and their types; an option left out has the reference tool's default.
METRIC_OPTIONS: Mapping[str, Mapping[str, type]] = {
    "exact_match": {
        "ignore_case": bool,
        "ignore_punctuation": bool,
        "ignore_numbers": bool,
        "regexes_to_ignore": list,
    },
    **{name: {"use_stemmer": bool} for name in text_metrics.ROUGE_TYPES},
    **{name: {"lowercase": bool} for name in CORPUS_METRICS},
}
# Resamples behind the bootstrap standard error of corpus metrics (lm-evaluation-harness
# also takes 1000 for BLEU and chrF).
BOOTSTRAP_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class GenerationMetric:
    """One metric of a generation task and its options (see METRIC_OPTIONS)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def corpus(self) -> bool:
        return self.name in CORPUS_METRICS


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """{name: mean, name_stderr: standard error of the mean (None for one example)} of each
    metric's per-example values (float64 math)."""
    out: dict[str, float | None] = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        out[name] = float(v.mean())
        out[f"{name}_stderr"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return out


def parse_metric(entry: Any, where: str) -> GenerationMetric:
    """A `metrics` entry of a task spec: a metric name, or {"metric": name, option: value}
    as in lm-evaluation-harness's metric_list; raises DataError naming `where`."""
    if isinstance(entry, str):
        entry = {"metric": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
        raise DataError(
            f"{where}: metrics entry {entry!r}; expected a metric name or "
            '{"metric": name, ...options}'
        )
    options = dict(entry)
    name = options.pop("metric")
    if name not in METRICS:
        raise DataError(f"{where}: metric {name!r} is unknown; expected one of {METRICS}")
    allowed = METRIC_OPTIONS[name]
    for key, value in options.items():
        if key not in allowed:
            raise DataError(
                f"{where}: {name} has no option {key!r}; expected some of {sorted(allowed)}"
            )
        kind = allowed[key]
        if not isinstance(value, kind) or (kind is list and not _patterns(value)):
            expected = "a list of regular expressions" if kind is list else kind.__name__
            raise DataError(f"{where}: {name} option {key}={value!r}; expected {expected}")
    if name == "exact_match":
        for pattern in options.get("regexes_to_ignore", []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise DataError(
                    f"{where}: exact_match regexes_to_ignore {pattern!r} is not a regular "
                    f"expression ({e})"
                ) from e
    if name in text_metrics.ROUGE_TYPES and options.get("use_stemmer"):
        try:
            text_metrics.require_stemmer()
        except ConfigError as e:
            raise DataError(f"{where}: {e}") from e
    # Tuples, not lists: a task spec is frozen.
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return GenerationMetric(name, tuple(sorted(frozen.items())))


def _patterns(value: list) -> bool:
    return all(isinstance(v, str) for v in value)


def _corpus_score(metric: GenerationMetric, stats: np.ndarray) -> float:
    """BLEU or chrF of summed statistics int[S]."""
    if metric.name == "bleu":
        return text_metrics.bleu_score(stats.tolist())
    return text_metrics.chrf_score(stats.tolist())


def _bootstrap_stderr(metric: GenerationMetric, stats: np.ndarray, seed: int) -> float | None:
    """Sample standard deviation of the corpus score over resamples of the examples (with
    replacement), lm-evaluation-harness's standard error of BLEU and chrF. stats: int[n, S],
    one row per example."""
    n = len(stats)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    scores = []
    # A resample is how often it draws each example, so its statistics are counts @ stats;
    # blocks of 100 resamples bound the [100, n] count matrix.
    for start in range(0, BOOTSTRAP_RESAMPLES, 100):
        block = min(100, BOOTSTRAP_RESAMPLES - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=block)
        scores += [_corpus_score(metric, row) for row in counts @ stats]
    return float(np.std(scores, ddof=1))


def _example_stats(metric: GenerationMetric, prediction: str, references: list[str]):
    if metric.name == "bleu":
        return text_metrics.bleu_stats(prediction, references, **metric.kwargs)
    word_order = 2 if metric.name == "chrf++" else 0
    return text_metrics.chrf_stats(prediction, references, word_order=word_order, **metric.kwargs)


def _example_score(metric: GenerationMetric, prediction: str, reference: str) -> float:
    if metric.name == "exact_match":
        return text_metrics.exact_match(prediction, reference, **metric.kwargs)
    scores = text_metrics.rouge(prediction, reference, (metric.name,), **metric.kwargs)
    return scores[metric.name].fmeasure


def score_generations(
    metrics: Sequence[GenerationMetric],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    seed: int = 1234,
) -> tuple[dict[str, float | None], list[dict[str, float]]]:
    """({name: value, name_stderr: ...}, one {name: value} per example) of each metric.

    Exact match and ROUGE score each prediction against its best reference (by F1, as
    rouge-score's score_multi) and are averaged over examples; BLEU and chrF are corpus
    scores over every example and all of its references (`<name>_stderr`: bootstrap with
    `seed`), with the sentence-level score per example (sacrebleu.sentence_bleu's and
    sentence_chrf's).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    pairs = list(zip(predictions, references, strict=True))
    per_example: list[dict[str, float]] = [{} for _ in pairs]
    summary: dict[str, float | None] = {}
    for metric in metrics:
        if metric.corpus:
            stats = np.asarray([_example_stats(metric, p, list(r)) for p, r in pairs], np.int64)
            summary[metric.name] = _corpus_score(metric, stats.sum(axis=0))
            summary[f"{metric.name}_stderr"] = _bootstrap_stderr(metric, stats, seed)
            if metric.name == "bleu":
                values = [text_metrics.bleu_score(s, effective_order=True) for s in stats.tolist()]
            else:
                values = [text_metrics.chrf_score(s) for s in stats.tolist()]
        else:
            values = [max(_example_score(metric, p, ref) for ref in refs) for p, refs in pairs]
            summary.update(summarize({metric.name: values}))
        for row, value in zip(per_example, values, strict=True):
            row[metric.name] = value
    return summary, per_example
