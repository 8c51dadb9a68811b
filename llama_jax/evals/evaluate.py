"""Evaluation with a model: task files (`eval_task`; their format and metrics are in
`tasks.py`), and the checks and batch placement every evaluation shares (`perplexity.py`
uses them too).

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
the task's metrics (`task_metrics.score_generations`: exact match, ROUGE, BLEU, chrF). Every
metric comes with its standard error (`<name>_stderr`).

What needs the tokenizer (empty targets, lengths) is checked by `eval_task` before the
model runs, what needs only the lengths by `check_task` (call it before loading a model);
everything else about a task file, by `tasks.load_task`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from llama_jax import sharding
from llama_jax.errors import DataError
from llama_jax.evals.task_metrics import score_generations, summarize
from llama_jax.evals.tasks import Task, cut_at_stop
from llama_jax.nn import Sampling, generate

# Row lengths are rounded up to powers of two from this, so a run compiles a few shapes.
_MIN_BUCKET = 16
# Texts per tokenizer call: bounds the memory of one encode_batch.
ENCODE_CHUNK = 4096

Progress = Callable[[int, int], None]


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
    """Raises DataError unless the tokenizer fits the model's vocabulary, max_len is in
    [2, max_position_embeddings] and batch_size splits over the mesh's batch shards. The
    evaluations check this themselves; call it to fail before a model is loaded."""
    if tokenizer.vocab_size > config.vocab_size:
        raise DataError(
            f"tokenizer vocabulary {tokenizer.vocab_size} ({tokenizer.path}) "
            f"exceeds the model's {config.vocab_size}"
        )
    if not isinstance(max_len, int) or not 2 <= max_len <= config.max_position_embeddings:
        raise DataError(
            f"seq_len={max_len!r}; expected an integer from 2 to the model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    shards = sharding.axis_size(mesh, rules, "batch")
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % shards:
        raise DataError(
            f"batch_size={batch_size!r}; expected a positive multiple of the "
            f"{shards} batch shards of mesh {dict(mesh.shape)}"
        )


def setup_mesh(model, tokenizer, max_len: int, batch_size: int, mesh, rules):
    """The mesh to evaluate on (None: the one the model's parameters are on), once
    `check_setup` passes for it."""
    mesh = _model_mesh(model) if mesh is None else mesh
    check_setup(model.config, tokenizer, max_len, batch_size, mesh, rules)
    return mesh


def check_task(task: Task, max_len: int) -> None:
    """Raises DataError if a generation task's max_new_tokens leaves no room for its prompt
    in max_len tokens."""
    if task.spec.type == "generate" and task.spec.max_new_tokens >= max_len:
        raise DataError(
            f"{task.path}: max_new_tokens={task.spec.max_new_tokens} leaves no room for "
            f"the prompt in seq_len={max_len}; expected max_new_tokens < seq_len"
        )


def _bucket(n: int, cap: int, low: int = _MIN_BUCKET) -> int:
    size = low
    while size < n:
        size *= 2
    return min(size, max(cap, n))


def on_mesh(arrays: Mapping[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
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
            out = score(state, on_mesh(host, mesh, rules))
        batch_ll, batch_greedy = jax.device_get(out)
        ll[picked] = batch_ll[: len(picked)]
        greedy[picked] = batch_greedy[: len(picked)]
        if progress is not None:
            progress(start + len(picked), n)
    return ll, greedy


def _prefix_id(tokenizer) -> int:
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise DataError(
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
    for i in range(0, len(moved), ENCODE_CHUNK):
        part = moved[i : i + ENCODE_CHUNK]
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
    mesh = setup_mesh(model, tokenizer, max_len, batch_size, mesh, rules)
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
            raise DataError(f"{where}: the target {target!r} encodes to no tokens after its prompt")
        if n_tokens > max_len:
            raise DataError(
                f"{where}: the target {target!r} is {n_tokens} tokens, more than seq_len={max_len}"
            )
    check_ids(sequences, model.config.vocab_size, task.path)
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
    return summarize(values), rows


def _generation(model, tokenizer, task, contexts, *, max_len, batch_size, add_bos, progress):
    spec = task.spec
    check_task(task, max_len)
    keep = max_len - spec.max_new_tokens
    prompts = [
        ids[-keep:] or [_prefix_id(tokenizer)]
        for ids in tokenizer.encode_batch(contexts, add_bos=add_bos)
    ]
    check_ids(prompts, model.config.vocab_size, task.path)
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
    references = [task.references(ex) for ex in task.examples]
    metrics, scores = score_generations(spec.metrics, texts, references, seed=spec.seed)
    rows = [
        {
            "line": ex.line,
            "prompt": contexts[i],
            "prediction": texts[i],
            "references": references[i],
            **scores[i],
        }
        for i, ex in enumerate(task.examples)
    ]
    return metrics, rows


def check_ids(sequences, vocab_size: int, where: str) -> None:
    """Raises DataError (naming `where`) if a token id of the int sequences is outside
    [0, vocab_size)."""
    for seq in sequences:
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise DataError(
                f"{where}: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size})"
            )
