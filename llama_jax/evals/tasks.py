"""Task files for few-shot evaluation, in the manner of lm-evaluation-harness. Pure Python:
the scoring with a model is in `evaluate.py`, the metrics of generated text in
`task_metrics.py` and `text_metrics.py`.

A task file is JSONL. The first non-blank line is `{"task": {...}}`, the spec; every further
line is one example, a JSON object of fields. Spec keys (only `type` and `prompt` are
required):

  name               the task's name in results (default: the file name without suffix)
  type               "multiple_choice" or "generate"
  prompt             the question, a str.format template over the example's fields, e.g.
                     "Question: {question}\\nAnswer:"; `{field[0]}` indexes a list field
  target             the text after the prompt, a template that may also use `{choice}`: the
                     choice being scored (multiple choice), or the right answer in a few-shot
                     example. Default " {choice}"
  description        text put once before everything else (default "")
  fewshot_separator  between few-shot examples and before the question (default "\\n\\n")
  num_fewshot        few-shot examples per prompt when the caller gives none (default 0)
  seed               the few-shot draw's seed (default 1234)
  choices            multiple choice: the field holding the list of choices, or a list of
                     strings shared by every example (e.g. ["A", "B", "C", "D"])
                     (default "choices")
  answer             multiple choice: the field holding the right choice, as a 0-based index
                     or as the choice's text (default "answer")
  reference          generate: the field holding the reference answer, a string or a list
                     of acceptable strings (default "answer")
  max_new_tokens     generate: tokens generated per example (default 32)
  stop               generate: strings the answer is cut at (default: the separator)
  metrics            generate: what the answers are scored by, a list of metric names or
                     {"metric": name, option: value, ...} objects as in lm-evaluation-harness's
                     metric_list (default ["exact_match", "rouge1", "rouge2", "rougeL",
                     "rougeLsum"]). Metrics and options (see `text_metrics`):
                       exact_match      ignore_case, ignore_punctuation, ignore_numbers,
                                        regexes_to_ignore (lm-evaluation-harness's options)
                       rouge1, rouge2,  use_stemmer (rouge-score's Porter stemming; needs
                       rougeL, rougeLsum  nltk)
                       bleu             lowercase (sacreBLEU's corpus BLEU, 13a tokens)
                       chrf, chrf++     lowercase (sacreBLEU's corpus chrF / chrF++)

An example line with `"_fewshot": true` only serves as a few-shot example and is never
scored. Few-shot examples for example i come from those lines if the file has any, else from
the other scored examples (never i itself): `np.random.default_rng([seed, i])` draws k of
them without replacement, and they appear in file order. The prompt is

  description + separator.join([prompt(s) + target(s) for s in shots] + [prompt(i)])

Generated answers are cut at the first stop string (`cut_at_stop`) and scored as
`task_metrics` describes.

Everything about a task file that needs no model (JSON, spec, templates, fields, answers,
the number of few-shot examples) is checked by `load_task`; what needs the tokenizer (empty
targets, lengths) is checked by `evaluate.eval_task` before the model runs.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from llama_jax import data
from llama_jax.errors import DataError
from llama_jax.evals.task_metrics import DEFAULT_METRICS, GenerationMetric, parse_metric

TASK_TYPES = ("multiple_choice", "generate")
FEWSHOT_KEY = "_fewshot"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The first line of a task file (see the module docstring)."""

    name: str
    type: str
    prompt: str
    target: str = " {choice}"
    description: str = ""
    fewshot_separator: str = "\n\n"
    num_fewshot: int = 0
    seed: int = 1234
    choices: str | tuple[str, ...] = "choices"
    answer: str = "answer"
    reference: str = "answer"
    max_new_tokens: int = 32
    stop: tuple[str, ...] | None = None
    metrics: tuple[GenerationMetric, ...] = ()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.fewshot_separator,) if self.stop is None else self.stop


@dataclasses.dataclass(frozen=True)
class Example:
    line: int
    fields: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """A loaded and checked task file. examples are scored; fewshot holds the lines
    marked `"_fewshot": true` (empty: shots come from the other examples)."""

    spec: TaskSpec
    path: str
    examples: tuple[Example, ...]
    fewshot: tuple[Example, ...]

    def where(self, ex: Example) -> str:
        return f"{self.path}:{ex.line}"

    def choices(self, ex: Example) -> list[str]:
        if not isinstance(self.spec.choices, str):
            return list(self.spec.choices)
        return ex.fields[self.spec.choices]

    def answer(self, ex: Example) -> int:
        """Index of the right choice."""
        value = ex.fields[self.spec.answer]
        return self.choices(ex).index(value) if isinstance(value, str) else value

    def references(self, ex: Example) -> list[str]:
        value = ex.fields[self.spec.reference]
        return [value] if isinstance(value, str) else list(value)

    def right_answer(self, ex: Example) -> str:
        if self.spec.type == "multiple_choice":
            return self.choices(ex)[self.answer(ex)]
        return self.references(ex)[0]

    def prompt(self, ex: Example) -> str:
        return _render(self.spec.prompt, ex.fields, self.where(ex), "prompt")

    def target(self, ex: Example, choice: str) -> str:
        return _render(self.spec.target, {**ex.fields, "choice": choice}, self.where(ex), "target")

    def max_fewshot(self) -> int:
        return len(self.fewshot) if self.fewshot else len(self.examples) - 1

    def check_fewshot(self, k: int) -> None:
        if not isinstance(k, int) or k < 0:
            raise DataError(f"{self.path}: num_fewshot={k!r}; expected an integer >= 0")
        if k > self.max_fewshot():
            source = (
                f"{len(self.fewshot)} lines marked {FEWSHOT_KEY!r}"
                if self.fewshot
                else f"{len(self.examples)} examples less the one scored"
            )
            raise DataError(
                f"{self.path}: num_fewshot={k} but only {self.max_fewshot()} few-shot examples "
                f"exist ({source})"
            )

    def shots(self, i: int, k: int) -> list[Example]:
        """The k few-shot examples of scored example i, in file order."""
        self.check_fewshot(k)
        pool = self.fewshot or self.examples[:i] + self.examples[i + 1 :]
        picked = np.random.default_rng([self.spec.seed, i]).choice(len(pool), k, replace=False)
        return [pool[j] for j in sorted(picked.tolist())]

    def context(self, i: int, k: int) -> str:
        """The full prompt of scored example i with k few-shot examples."""
        parts = [self.prompt(s) + self.target(s, self.right_answer(s)) for s in self.shots(i, k)]
        parts.append(self.prompt(self.examples[i]))
        return self.spec.description + self.spec.fewshot_separator.join(parts)


_SPEC_FIELDS = {f.name: f for f in dataclasses.fields(TaskSpec)}
_STRING_KEYS = (
    "name",
    "type",
    "prompt",
    "target",
    "description",
    "fewshot_separator",
    "answer",
    "reference",
)


def load_task(path) -> Task:
    """Reads and checks a task file: JSON, the spec, every template on every example, the
    choices and answers or references, and the spec's num_fewshot."""
    path = epath.Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    records = list(data.records(path))
    if not records:
        raise DataError(
            f'task file {path} is empty; expected a first line {{"task": {{...}}}} and then '
            "one example per line"
        )
    spec_line, first = records[0]
    if list(first) != ["task"] or not isinstance(first["task"], dict):
        raise DataError(
            f'{path}:{spec_line}: the first line must be {{"task": {{...}}}} holding the task '
            f"spec; got an object with keys {sorted(first)}"
        )
    spec = _parse_spec(first["task"], f"{path}:{spec_line}", path.stem)
    examples, fewshot = [], []
    for line_no, record in records[1:]:
        marked = record.pop(FEWSHOT_KEY, False)
        if not isinstance(marked, bool):
            raise DataError(f"{path}:{line_no}: {FEWSHOT_KEY} is {marked!r}; expected true/false")
        (fewshot if marked else examples).append(Example(line_no, record))
    if not examples:
        raise DataError(f"{path} has no examples to score after its spec line")
    task = Task(spec, str(path), tuple(examples), tuple(fewshot))
    for ex in task.examples + task.fewshot:
        _check_example(task, ex)
    task.check_fewshot(spec.num_fewshot)
    return task


def _parse_spec(raw: Mapping[str, Any], where: str, default_name: str) -> TaskSpec:
    unknown = sorted(set(raw) - set(_SPEC_FIELDS))
    if unknown:
        raise DataError(
            f"{where}: unknown task spec keys {unknown}; expected some of {sorted(_SPEC_FIELDS)}"
        )
    for key in ("type", "prompt"):
        if key not in raw:
            raise DataError(f"{where}: the task spec has no {key!r}")
    if raw["type"] not in TASK_TYPES:
        raise DataError(
            f"{where}: task type {raw['type']!r} is unknown; expected one of {TASK_TYPES}"
        )
    values = dict(raw, name=raw.get("name", default_name))
    for key in _STRING_KEYS:
        if key in values and not isinstance(values[key], str):
            raise DataError(f"{where}: {key} is {values[key]!r}; expected a string")
    for key, low in (("num_fewshot", 0), ("seed", 0), ("max_new_tokens", 1)):
        value = values.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{where}: {key} is {value!r}; expected an integer >= {low}")
    choices = values.get("choices", "choices")
    if not isinstance(choices, str):
        if not _strings(choices):
            raise DataError(
                f"{where}: choices is {choices!r}; expected a field name or a "
                "non-empty list of strings"
            )
        values["choices"] = tuple(choices)
    if "stop" in values:
        if not _strings(values["stop"]) or not all(values["stop"]):
            raise DataError(
                f"{where}: stop is {values['stop']!r}; expected a non-empty list "
                "of non-empty strings"
            )
        values["stop"] = tuple(values["stop"])
    if values["type"] == "generate":
        values["metrics"] = _parse_metrics(values.get("metrics", list(DEFAULT_METRICS)), where)
    elif "metrics" in values:
        raise DataError(
            f"{where}: metrics apply to generate tasks; multiple choice reports acc and acc_norm"
        )
    return TaskSpec(**values)


def _parse_metrics(entries, where: str) -> tuple[GenerationMetric, ...]:
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: metrics is {entries!r}; expected a non-empty list")
    metrics = tuple(parse_metric(entry, where) for entry in entries)
    names = [m.name for m in metrics]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{where}: metrics {repeated} are listed more than once")
    return metrics


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_example(task: Task, ex: Example) -> None:
    spec, where = task.spec, task.where(ex)
    task.prompt(ex)
    if spec.type == "multiple_choice":
        if isinstance(spec.choices, str):
            _require_field(ex, spec.choices, where, "choices")
            if not _strings(ex.fields[spec.choices]):
                raise DataError(
                    f"{where}: {spec.choices} is {ex.fields[spec.choices]!r}; "
                    "expected a non-empty list of strings"
                )
        choices = task.choices(ex)
        _require_field(ex, spec.answer, where, "answer")
        answer = ex.fields[spec.answer]
        if isinstance(answer, str):
            if answer not in choices:
                raise DataError(f"{where}: answer {answer!r} is not one of the choices {choices}")
        elif not isinstance(answer, int) or isinstance(answer, bool):
            raise DataError(
                f"{where}: {spec.answer} is {answer!r}; expected a choice index or a choice's text"
            )
        elif not 0 <= answer < len(choices):
            raise DataError(
                f"{where}: answer index {answer} is out of range for "
                f"{len(choices)} choices (expected 0 to {len(choices) - 1})"
            )
        for choice in choices:
            task.target(ex, choice)
    else:
        _require_field(ex, spec.reference, where, "reference")
        value = ex.fields[spec.reference]
        if not (isinstance(value, str) or _strings(value)):
            raise DataError(
                f"{where}: {spec.reference} is {value!r}; expected a string or a "
                "non-empty list of strings"
            )
        task.target(ex, task.right_answer(ex))


def _require_field(ex: Example, name: str, where: str, role: str) -> None:
    if name not in ex.fields:
        raise DataError(
            f"{where}: the example has no field {name!r} (the task's {role}); "
            f"it has {sorted(ex.fields)}"
        )


def _render(template: str, fields: Mapping[str, Any], where: str, what: str) -> str:
    """str.format of a task template, with errors that name the template and the field."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"{where}: the {what} template {template!r} is malformed ({e})") from e
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit() or "." in name:
            raise DataError(
                f"{where}: the {what} template {template!r} has the field "
                f"{{{name}}}; expected {{name}} or {{name[index]}}"
            )
        if root not in fields:
            hint = " ({choice} exists only in the target template)" if root == "choice" else ""
            raise DataError(
                f"{where}: the {what} template {template!r} uses {{{root}}} but "
                f"the example has no field {root!r}{hint}; it has {sorted(fields)}"
            )
    try:
        return template.format_map(fields)
    except (LookupError, TypeError, ValueError) as e:
        raise DataError(f"{where}: cannot fill the {what} template {template!r} ({e!r})") from e


# --- metrics --------------------------------------------------------------------------


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text
