"""Evaluation: perplexity of a text or JSONL file, and task files (multiple choice and
generation) in the manner of lm-evaluation-harness.

Perplexity (`read_documents`, `eval_perplexity`)
  Documents are read as training data is (`data.py`: text split at blank lines, or a JSONL
  field) and tokenized as BOS + text + EOS (`add_bos`, `add_eos`). Every token after a
  document's first is predicted exactly once, from its own document only. A document longer
  than `seq_len` + 1 tokens is cut into consecutive windows of `seq_len` predictions, and
  each window sees only its own tokens, so like any fixed-window perplexity the figure
  depends on `seq_len`. Windows are packed several to a row, each its own segment
  (attention never crosses segments and positions restart in each), which scores exactly
  what one window per row (`pack=False`) scores, with less padding. The loss is the float32
  chunked cross-entropy of training; perplexity = exp(summed loss / tokens).

Task files (`load_task`, `eval_task`)
  JSONL. The first non-blank line is `{"task": {...}}`, the spec; every further line is one
  example, a JSON object of fields. Spec keys (only `type` and `prompt` are required):

    name               the task's name in results (default: the file name without suffix)
    type               "multiple_choice" or "generate"
    prompt             the question, a str.format template over the example's fields, e.g.
                       "Question: {question}\\nAnswer:"; `{field[0]}` indexes a list field
    target             the text after the prompt, a template that may also use `{choice}`:
                       the choice being scored (multiple choice), or the right answer in a
                       few-shot example. Default " {choice}"
    description        text put once before everything else (default "")
    fewshot_separator  between few-shot examples and before the question (default "\\n\\n")
    num_fewshot        few-shot examples per prompt when the caller gives none (default 0)
    seed               the few-shot draw's seed (default 1234)
    choices            multiple choice: the field holding the list of choices, or a list
                       of strings shared by every example (e.g. ["A", "B", "C", "D"])
                       (default "choices")
    answer             multiple choice: the field holding the right choice, as a 0-based
                       index or as the choice's text (default "answer")
    reference          generate: the field holding the reference answer, a string or a
                       list of acceptable strings (default "answer")
    max_new_tokens     generate: tokens generated per example (default 32)
    stop               generate: strings the answer is cut at (default: the separator)

  An example line with `"_fewshot": true` only serves as a few-shot example and is never
  scored. Few-shot examples for example i come from those lines if the file has any, else
  from the other scored examples (never i itself): `np.random.default_rng([seed, i])` draws
  k of them without replacement, and they appear in file order. The prompt is

    description + separator.join([prompt(s) + target(s) for s in shots] + [prompt(i)])

  Multiple choice scores each choice by the summed log-likelihood of its tokens after the
  prompt. As in lm-evaluation-harness, whitespace at the end of the prompt moves to the
  start of the target, the prompt and prompt + target are tokenized separately and the
  target's tokens are what the second has beyond the first, and a prompt with no tokens
  (no BOS) is preceded by the BOS or EOS token. `acc` takes the most likely choice, and
  `acc_norm` the one with the highest log-likelihood per character of the scored text
  (the rendered target with the moved whitespace).
  A sequence longer than `max_len` + 1 tokens loses the start of its prompt (the target must
  fit). Generation is greedy, up to `max_new_tokens`, its prompt likewise cut to its last
  `max_len - max_new_tokens` tokens; the text is cut at the first stop string and scored by
  `exact_match` (equal after stripping whitespace) and `rouge_l` (F1 of the longest common
  subsequence of lower-cased whitespace-separated words), the best over the references.
  Every metric comes with its standard error over examples (`<name>_stderr`).

Everything about a task file that needs no model (JSON, spec, templates, fields, answers,
the number of few-shot examples) is checked by `load_task`; what needs the tokenizer (empty
targets, lengths) is checked by `eval_task` before the model runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from llama_jax import data, distill, sharding
from llama_jax.generate import Sampling, generate

TASK_TYPES = ("multiple_choice", "generate")
FORMATS = ("text", "jsonl")
FEWSHOT_KEY = "_fewshot"
# Row lengths are rounded up to powers of two from this, so a run compiles a few shapes.
_MIN_BUCKET = 16
_ENCODE_CHUNK = 4096

Progress = Callable[[int, int], None]


class EvalError(ValueError):
    """A task file, data file or evaluation setting that cannot be evaluated."""


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
            raise EvalError(f"{self.path}: num_fewshot={k!r}; expected an integer >= 0")
        if k > self.max_fewshot():
            source = (
                f"{len(self.fewshot)} lines marked {FEWSHOT_KEY!r}"
                if self.fewshot
                else f"{len(self.examples)} examples less the one scored"
            )
            raise EvalError(
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
        raise EvalError(f"task file {path} does not exist")
    records = []
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise EvalError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}"
                )
            records.append((line_no, record))
    if not records:
        raise EvalError(
            f'task file {path} is empty; expected a first line {{"task": {{...}}}} and then '
            "one example per line"
        )
    spec_line, first = records[0]
    if list(first) != ["task"] or not isinstance(first["task"], dict):
        raise EvalError(
            f'{path}:{spec_line}: the first line must be {{"task": {{...}}}} holding the task '
            f"spec; got an object with keys {sorted(first)}"
        )
    spec = _parse_spec(first["task"], f"{path}:{spec_line}", path.stem)
    examples, fewshot = [], []
    for line_no, record in records[1:]:
        marked = record.pop(FEWSHOT_KEY, False)
        if not isinstance(marked, bool):
            raise EvalError(f"{path}:{line_no}: {FEWSHOT_KEY} is {marked!r}; expected true/false")
        (fewshot if marked else examples).append(Example(line_no, record))
    if not examples:
        raise EvalError(f"{path} has no examples to score after its spec line")
    task = Task(spec, str(path), tuple(examples), tuple(fewshot))
    for ex in task.examples + task.fewshot:
        _check_example(task, ex)
    task.check_fewshot(spec.num_fewshot)
    return task


def _parse_spec(raw: Mapping[str, Any], where: str, default_name: str) -> TaskSpec:
    unknown = sorted(set(raw) - set(_SPEC_FIELDS))
    if unknown:
        raise EvalError(
            f"{where}: unknown task spec keys {unknown}; expected some of {sorted(_SPEC_FIELDS)}"
        )
    for key in ("type", "prompt"):
        if key not in raw:
            raise EvalError(f"{where}: the task spec has no {key!r}")
    if raw["type"] not in TASK_TYPES:
        raise EvalError(
            f"{where}: task type {raw['type']!r} is unknown; expected one of {TASK_TYPES}"
        )
    values = dict(raw, name=raw.get("name", default_name))
    for key in _STRING_KEYS:
        if key in values and not isinstance(values[key], str):
            raise EvalError(f"{where}: {key} is {values[key]!r}; expected a string")
    for key, low in (("num_fewshot", 0), ("seed", 0), ("max_new_tokens", 1)):
        value = values.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise EvalError(f"{where}: {key} is {value!r}; expected an integer >= {low}")
    choices = values.get("choices", "choices")
    if not isinstance(choices, str):
        if not _strings(choices):
            raise EvalError(
                f"{where}: choices is {choices!r}; expected a field name or a "
                "non-empty list of strings"
            )
        values["choices"] = tuple(choices)
    if "stop" in values:
        if not _strings(values["stop"]) or not all(values["stop"]):
            raise EvalError(
                f"{where}: stop is {values['stop']!r}; expected a non-empty list "
                "of non-empty strings"
            )
        values["stop"] = tuple(values["stop"])
    return TaskSpec(**values)


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_example(task: Task, ex: Example) -> None:
    spec, where = task.spec, task.where(ex)
    task.prompt(ex)
    if spec.type == "multiple_choice":
        if isinstance(spec.choices, str):
            _require_field(ex, spec.choices, where, "choices")
            if not _strings(ex.fields[spec.choices]):
                raise EvalError(
                    f"{where}: {spec.choices} is {ex.fields[spec.choices]!r}; "
                    "expected a non-empty list of strings"
                )
        choices = task.choices(ex)
        _require_field(ex, spec.answer, where, "answer")
        answer = ex.fields[spec.answer]
        if isinstance(answer, str):
            if answer not in choices:
                raise EvalError(f"{where}: answer {answer!r} is not one of the choices {choices}")
        elif not isinstance(answer, int) or isinstance(answer, bool):
            raise EvalError(
                f"{where}: {spec.answer} is {answer!r}; expected a choice index or a choice's text"
            )
        elif not 0 <= answer < len(choices):
            raise EvalError(
                f"{where}: answer index {answer} is out of range for "
                f"{len(choices)} choices (expected 0 to {len(choices) - 1})"
            )
        for choice in choices:
            task.target(ex, choice)
    else:
        _require_field(ex, spec.reference, where, "reference")
        value = ex.fields[spec.reference]
        if not (isinstance(value, str) or _strings(value)):
            raise EvalError(
                f"{where}: {spec.reference} is {value!r}; expected a string or a "
                "non-empty list of strings"
            )
        task.target(ex, task.right_answer(ex))


def _require_field(ex: Example, name: str, where: str, role: str) -> None:
    if name not in ex.fields:
        raise EvalError(
            f"{where}: the example has no field {name!r} (the task's {role}); "
            f"it has {sorted(ex.fields)}"
        )


def _render(template: str, fields: Mapping[str, Any], where: str, what: str) -> str:
    """str.format of a task template, with errors that name the template and the field."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise EvalError(f"{where}: the {what} template {template!r} is malformed ({e})") from e
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit() or "." in name:
            raise EvalError(
                f"{where}: the {what} template {template!r} has the field "
                f"{{{name}}}; expected {{name}} or {{name[index]}}"
            )
        if root not in fields:
            hint = " ({choice} exists only in the target template)" if root == "choice" else ""
            raise EvalError(
                f"{where}: the {what} template {template!r} uses {{{root}}} but "
                f"the example has no field {root!r}{hint}; it has {sorted(fields)}"
            )
    try:
        return template.format_map(fields)
    except (LookupError, TypeError, ValueError) as e:
        raise EvalError(f"{where}: cannot fill the {what} template {template!r} ({e!r})") from e


# --- metrics --------------------------------------------------------------------------


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two are equal after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace-separated words: the longest common
    subsequence's length over each side's length, combined harmonically. Two empty
    texts score 1.0; one empty text 0.0."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    row = [0] * (len(ref) + 1)
    for p in pred:
        diag = 0
        for j, r in enumerate(ref, 1):
            diag, row[j] = row[j], diag + 1 if p == r else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def _summary(values: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        out[name] = float(v.mean())
        out[f"{name}_stderr"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return out


# --- running the model ----------------------------------------------------------------


def _model_mesh(model):
    """The mesh the model's parameters live on (one device if they carry no mesh)."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return sharding.create_mesh(devices=jax.devices()[:1])


def check_setup(
    config, tokenizer, max_len: int, batch_size: int, mesh, rules=sharding.DEFAULT_RULES
) -> None:
    """Raises EvalError unless the tokenizer fits the model's vocabulary, max_len is in
    [2, max_position_embeddings] and batch_size splits over the mesh's batch shards. The
    evaluations check this themselves; call it to fail before a model is loaded."""
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalError(
            f"tokenizer vocabulary {tokenizer.vocab_size} ({tokenizer.path}) "
            f"exceeds the model's {config.vocab_size}"
        )
    if not isinstance(max_len, int) or not 2 <= max_len <= config.max_position_embeddings:
        raise EvalError(
            f"seq_len={max_len!r}; expected an integer from 2 to the model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    shards = sharding.axis_size(mesh, rules, "batch")
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % shards:
        raise EvalError(
            f"batch_size={batch_size!r}; expected a positive multiple of the "
            f"{shards} batch shards of mesh {dict(mesh.shape)}"
        )


def _setup(model, tokenizer, max_len, batch_size, mesh, rules):
    mesh = _model_mesh(model) if mesh is None else mesh
    check_setup(model.config, tokenizer, max_len, batch_size, mesh, rules)
    return mesh


def _bucket(n: int, cap: int, low: int = _MIN_BUCKET) -> int:
    size = low
    while size < n:
        size *= 2
    return min(size, max(cap, n))


def _on_mesh(arrays: Mapping[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """Host arrays [B] or [B, T] (identical on every process) as global arrays split over
    the mesh's batch axes; each process places only its own devices' rows."""
    out = {}
    for name, a in arrays.items():
        spec = sharding.logical_to_spec(("batch", "length")[: a.ndim], a.shape, mesh, rules)
        out[name] = jax.make_array_from_callback(
            a.shape, NamedSharding(mesh, spec), lambda index, a=a: a[index]
        )
    return out


def row_log_likelihoods(unembed, h_BCD, targets_BC, mask_BC, *, chunk: int = 512):
    """Per-row summed log-probabilities of the targets, and whether each was the argmax.

    unembed: [B, c, D] -> float32 [B, c, V] logits; h: [B, C, D] hidden states of the
    positions that predict targets: int[B, C]; mask: [B, C], non-zero where a target
    counts. The logits are made `chunk` positions at a time, so at most a float32
    [B, chunk, V] block exists. Returns (float32[B], bool[B]).
    """
    b, c, _ = h_BCD.shape
    chunk = max(1, min(chunk, c))
    pad = -c % chunk

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, (c + pad) // chunk, chunk, *x.shape[2:]), 1, 0)

    def body(carry, xs):
        ll_B, greedy_B = carry
        h, targets, mask = xs
        logits = sharding.constrain(unembed(h).astype(jnp.float32), ("batch", "length", "vocab"))
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        counted = mask != 0
        best = jnp.argmax(logits, axis=-1) == targets
        ll_B = ll_B + jnp.sum(jnp.where(counted, logp, 0.0), axis=1)
        return (ll_B, greedy_B & jnp.all(best | ~counted, axis=1)), None

    init = (jnp.zeros((b,), jnp.float32), jnp.ones((b,), bool))
    (ll_B, greedy_B), _ = jax.lax.scan(
        body, init, (split(h_BCD), split(targets_BC), split(mask_BC))
    )
    return ll_B, greedy_B


@functools.lru_cache(maxsize=8)
def _make_scorer(graphdef, loss_chunk: int):
    """score(params, batch) -> `row_log_likelihoods` of each row's scored span, jitted.

    batch: int32 tokens [B, T], segment_ids [B, T] (0: padding), start [B] (the input
    position predicting the first scored token), targets [B, C] and loss_mask [B, C] over
    the C scored positions."""

    def score(params, batch):
        model = nnx.merge(graphdef, params)
        h_BTD, _ = model.hidden_states(batch["tokens"], segment_ids_BT=batch["segment_ids"])
        c, t = batch["targets"].shape[1], h_BTD.shape[1]
        idx_BC = jnp.minimum(batch["start"][:, None] + jnp.arange(c, dtype=jnp.int32), t - 1)
        h_BCD = jnp.take_along_axis(h_BTD, idx_BC[..., None], axis=1)
        out = row_log_likelihoods(
            lambda h: model.unembed(h, out_dtype=jnp.float32),
            h_BCD,
            batch["targets"],
            batch["loss_mask"],
            chunk=loss_chunk,
        )
        # Replicated, so that every process can read all rows.
        return tuple(sharding.constrain(x, (None,)) for x in out)

    return jax.jit(score)


def _score_continuations(
    model, sequences, cont_lens, *, max_len, batch_size, mesh, rules, loss_chunk, progress
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-likelihood (float64[R]) and greedy flags (bool[R]) of the last
    cont_lens[r] tokens of each token sequence, given the tokens before them (the oldest
    dropped beyond max_len + 1 tokens)."""
    n = len(sequences)
    rows = [s[-(max_len + 1) :] for s in sequences]
    order = sorted(range(n), key=lambda r: -len(rows[r]))
    c = _bucket(max(cont_lens), max_len, low=8)
    graphdef, state = nnx.split(model)
    score = _make_scorer(graphdef, loss_chunk)
    ll, greedy = np.zeros(n), np.zeros(n, bool)
    for start in range(0, n, batch_size):
        picked = order[start : start + batch_size]
        t = _bucket(len(rows[picked[0]]) - 1, max_len)
        host = {
            "tokens": np.zeros((batch_size, t), np.int32),
            "segment_ids": np.zeros((batch_size, t), np.int32),
            "start": np.zeros((batch_size,), np.int32),
            "targets": np.zeros((batch_size, c), np.int32),
            "loss_mask": np.zeros((batch_size, c), np.int32),
        }
        for j, r in enumerate(picked):
            seq, k = rows[r], cont_lens[r]
            host["tokens"][j, : len(seq) - 1] = seq[:-1]
            host["segment_ids"][j, : len(seq) - 1] = 1
            host["start"][j] = len(seq) - 1 - k
            host["targets"][j, :k] = seq[-k:]
            host["loss_mask"][j, :k] = 1
        with sharding.activation_sharding(mesh, rules):
            out = score(state, _on_mesh(host, mesh, rules))
        batch_ll, batch_greedy = jax.device_get(out)
        ll[picked] = batch_ll[: len(picked)]
        greedy[picked] = batch_greedy[: len(picked)]
        if progress is not None:
            progress(start + len(picked), n)
    return ll, greedy


def _prefix_id(tokenizer) -> int:
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise EvalError(
            f"a prompt encodes to no tokens and the tokenizer {tokenizer.path} has "
            "neither BOS nor EOS to start it with"
        )
    return prefix


def _encode_pairs(tokenizer, pairs, add_bos) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompt + target token ids, number of target tokens, characters of the target with
    the whitespace moved to it) of each (prompt, target)."""
    moved = []
    for context, target in pairs:
        kept = context.rstrip()
        # Tokenizers attach a space to the word after it, so it belongs to the target.
        moved.append((kept, context[len(kept) :] + target))
    ctx_ids, whole_ids = [], []
    for i in range(0, len(moved), _ENCODE_CHUNK):
        part = moved[i : i + _ENCODE_CHUNK]
        ctx_ids += tokenizer.encode_batch([c for c, _ in part], add_bos=add_bos)
        whole_ids += tokenizer.encode_batch([c + t for c, t in part], add_bos=add_bos)
    sequences, lengths = [], []
    for ctx, whole in zip(ctx_ids, whole_ids, strict=True):
        cont = whole[len(ctx) :]
        sequences.append((ctx or [_prefix_id(tokenizer)]) + cont)
        lengths.append(len(cont))
    return sequences, lengths, [len(t) for _, t in moved]


def eval_task(
    model,
    tokenizer,
    task: Task,
    *,
    num_fewshot: int | None = None,
    max_len: int,
    batch_size: int,
    add_bos: bool | None = None,
    mesh=None,
    rules=sharding.DEFAULT_RULES,
    loss_chunk: int = 512,
    details: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Runs a task file (see the module docstring) and returns its results:
    {"task", "type", "path", "num_fewshot", "n", "metrics"}, plus "examples" (one dict per
    scored example) with `details`.

    num_fewshot: default the spec's. max_len: the longest token sequence the model sees.
    batch_size: rows per step, a multiple of the mesh's batch shards. add_bos: default the
    tokenizer's. mesh: default the one the model's parameters are on. progress(done,
    total) is called after each batch.
    """
    k = task.spec.num_fewshot if num_fewshot is None else num_fewshot
    task.check_fewshot(k)
    mesh = _setup(model, tokenizer, max_len, batch_size, mesh, rules)
    contexts = [task.context(i, k) for i in range(len(task.examples))]
    run = dict(max_len=max_len, batch_size=batch_size, add_bos=add_bos, progress=progress)
    if task.spec.type == "multiple_choice":
        metrics, rows = _multiple_choice(
            model, tokenizer, task, contexts, **run, mesh=mesh, rules=rules, loss_chunk=loss_chunk
        )
    else:
        metrics, rows = _generation(model, tokenizer, task, contexts, **run)
    result = {
        "task": task.spec.name,
        "type": task.spec.type,
        "path": task.path,
        "num_fewshot": k,
        "n": len(task.examples),
        "metrics": metrics,
    }
    if details:
        result["examples"] = rows
    return result


def _multiple_choice(
    model,
    tokenizer,
    task,
    contexts,
    *,
    max_len,
    batch_size,
    mesh,
    add_bos,
    rules,
    loss_chunk,
    progress,
):
    pairs, owners = [], []
    for i, ex in enumerate(task.examples):
        for choice in task.choices(ex):
            pairs.append((contexts[i], task.target(ex, choice)))
            owners.append(i)
    sequences, cont_lens, chars = _encode_pairs(tokenizer, pairs, add_bos)
    for (_, target), n_tokens, i in zip(pairs, cont_lens, owners, strict=True):
        where = task.where(task.examples[i])
        if n_tokens == 0:
            raise EvalError(f"{where}: the target {target!r} encodes to no tokens after its prompt")
        if n_tokens > max_len:
            raise EvalError(
                f"{where}: the target {target!r} is {n_tokens} tokens, more than seq_len={max_len}"
            )
    _check_ids(sequences, model.config.vocab_size, task.path)
    ll, greedy = _score_continuations(
        model,
        sequences,
        cont_lens,
        max_len=max_len,
        batch_size=batch_size,
        mesh=mesh,
        rules=rules,
        loss_chunk=loss_chunk,
        progress=progress,
    )
    values: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    rows, at = [], 0
    for i, ex in enumerate(task.examples):
        m = len(task.choices(ex))
        lls, norm = ll[at : at + m], ll[at : at + m] / np.asarray(chars[at : at + m])
        answer = task.answer(ex)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(norm))
        values["acc"].append(float(pred == answer))
        values["acc_norm"].append(float(pred_norm == answer))
        rows.append(
            {
                "line": ex.line,
                "prompt": contexts[i],
                "log_likelihoods": lls.tolist(),
                "greedy": greedy[at : at + m].tolist(),
                "answer": answer,
                "pred": pred,
                "pred_norm": pred_norm,
            }
        )
        at += m
    return _summary(values), rows


def _generation(model, tokenizer, task, contexts, *, max_len, batch_size, add_bos, progress):
    spec = task.spec
    keep = max_len - spec.max_new_tokens
    if keep < 1:
        raise EvalError(
            f"{task.path}: max_new_tokens={spec.max_new_tokens} leaves no room for "
            f"the prompt in seq_len={max_len}"
        )
    prompts = [
        ids[-keep:] or [_prefix_id(tokenizer)]
        for ids in tokenizer.encode_batch(contexts, add_bos=add_bos)
    ]
    _check_ids(prompts, model.config.vocab_size, task.path)
    eos_ids = tokenizer.eos_ids or model.config.eos_token_ids
    order = sorted(range(len(prompts)), key=lambda r: -len(prompts[r]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        # Full batches only: one compiled shape per prompt-length bucket.
        batch = [prompts[r] for r in picked] + [prompts[picked[-1]]] * (batch_size - len(picked))
        outs = generate(
            model,
            batch,
            max_new_tokens=spec.max_new_tokens,
            sampling=Sampling(temperature=0.0),
            eos_ids=eos_ids,
            pad_id=tokenizer.pad_id,
        )
        for r, out in zip(picked, outs, strict=False):
            text = tokenizer.decode([t for t in out if t < tokenizer.vocab_size])
            texts[r] = cut_at_stop(text, spec.stop_strings)
        if progress is not None:
            progress(start + len(picked), len(order))
    values: dict[str, list[float]] = {"exact_match": [], "rouge_l": []}
    rows = []
    for i, ex in enumerate(task.examples):
        refs = task.references(ex)
        em = max(exact_match(texts[i], r) for r in refs)
        rl = max(rouge_l(texts[i], r) for r in refs)
        values["exact_match"].append(em)
        values["rouge_l"].append(rl)
        rows.append(
            {
                "line": ex.line,
                "prompt": contexts[i],
                "prediction": texts[i],
                "references": refs,
                "exact_match": em,
                "rouge_l": rl,
            }
        )
    return _summary(values), rows


def _check_ids(sequences, vocab_size: int, where: str) -> None:
    for seq in sequences:
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise EvalError(
                f"{where}: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size})"
            )


# --- perplexity -----------------------------------------------------------------------


# Cached so that evaluating model after model of one architecture compiles once.
_eval_step = functools.lru_cache(maxsize=8)(distill.make_eval_step)


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
        raise EvalError(f"data format {format!r} is unknown; expected one of {FORMATS}")
    if format == "jsonl" and not field:
        raise EvalError("field is empty; expected the JSONL key that holds each document")
    if not path.is_file():
        raise EvalError(f"data file {path} does not exist")
    docs = data.read_text(path) if format == "text" else data.read_jsonl(path, field)
    if not docs:
        raise EvalError(f"data file {path} holds no documents")
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
    mesh = _setup(model, tokenizer, seq_len, batch_size, mesh, rules)
    encoded = []
    for i in range(0, len(documents), _ENCODE_CHUNK):
        encoded += tokenizer.encode_batch(
            documents[i : i + _ENCODE_CHUNK], add_bos=add_bos, add_eos=add_eos
        )
    tokens = sum(max(len(ids) - 1, 0) for ids in encoded)
    if tokens == 0:
        raise EvalError(f"the {len(documents)} documents have no tokens to predict")
    _check_ids(encoded, model.config.vocab_size, "the documents")
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
            out = step(state, _on_mesh(host, mesh, rules))
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
