"""On-policy distillation's samples: prompts continued by the student itself.

On a step that samples (a fraction `lmbda` of them, chosen by `is_on_policy` from the
seed and the step alone, so every host and every resume agrees), the student's current
parameters continue B prompts by up to `max_new_tokens` tokens with the on-device
decode loop (a static KV cache, no Python per token), and the result is laid out as a
training batch of the run's shape [B, T]:

    columns [0, P)   the prompt, left-padded (segment 0), P = T - max_new_tokens
    columns [P, T)   the sampled tokens, then padding after a row's EOS

The loss mask covers the sampled tokens only (EOS included). Prompts are cut from the
training rows at a random point keeping at least `min_prompt` tokens (the documents
packed before the cut stay, as separate segments nothing crosses), or come from a
JSONL file. No gradient flows through sampling: the sampler is its own jitted
function, run before the step on the same parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import data, nn, sharding
from llama_jax.distill.spec import OnPolicySpec
from llama_jax.errors import ConfigError, DataError
from llama_jax.nn import segment_positions

_SALT = 0x6B44  # separates these draws from the data order's


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether step `step` (0-based) samples: a pure function of (seed, step)."""
    if lmbda >= 1 or lmbda <= 0:
        return lmbda >= 1
    return bool(np.random.default_rng([seed, step, _SALT]).random() < lmbda)


def sampling_steps(seed: int, steps: int, lmbda: float) -> int:
    """How many of steps 0 .. steps - 1 sample."""
    return sum(is_on_policy(seed, s, lmbda) for s in range(steps))


def onpolicy_fraction(seed: int, steps: int, lmbda: float) -> float:
    """The fraction of steps 0 .. steps - 1 that sample."""
    return sampling_steps(seed, steps, lmbda) / steps if steps else 0.0


def cut_prompts(tokens_BT, segment_ids_BT, key, *, prompt_len: int, min_prompt: int):
    """Prompts cut from training rows, right-aligned in [B, P] (P = prompt_len).

    Row b keeps its first c_b tokens, c_b uniform in [min_prompt, P] but never past the
    row's real tokens (segment id > 0). Returns (tokens, segment_ids, positions), each
    int32[B, P], padding segment 0; positions restart in each document as in training.
    """
    b = tokens_BT.shape[0]
    p = prompt_len
    tokens, segments = tokens_BT[:, :p], segment_ids_BT[:, :p]
    positions = segment_positions(segment_ids_BT)[:, :p]
    real_B = jnp.sum(segments > 0, axis=1)
    cut_B = jax.random.randint(key, (b,), min_prompt, p + 1)
    cut_B = jnp.maximum(jnp.minimum(cut_B, real_B), 1)
    shift_B = p - cut_B
    roll = jax.vmap(jnp.roll)
    keep = jnp.arange(p)[None, :] >= shift_B[:, None]
    return (
        jnp.where(keep, roll(tokens, shift_B), 0).astype(jnp.int32),
        jnp.where(keep, roll(segments, shift_B), 0).astype(jnp.int32),
        jnp.where(keep, roll(positions, shift_B), 0).astype(jnp.int32),
    )


def complete(
    model,
    tokens_BP,
    segment_ids_BP,
    positions_BP,
    key,
    *,
    spec: OnPolicySpec,
    eos_ids: tuple[int, ...],
    pad_id: int,
):
    """The model's continuation of right-aligned prompts as a training batch.

    tokens, segment_ids, positions: int32[B, P] (see `cut_prompts`). Returns (batch,
    lengths): batch maps data.FIELDS to int32[B, T] with T = P + max_new_tokens, its loss mask 1 on
    the sampled tokens' positions; lengths int32[B] counts each row's sampled tokens
    (EOS included). A row whose prompt is all padding samples nothing.
    """
    b, p = tokens_BP.shape
    g = spec.max_new_tokens
    segment_B = segment_ids_BP[:, -1]
    new_tokens, length_B = nn.decode(
        model,
        tokens_BP,
        segment_ids_BP,
        positions_BP,
        key,
        max_new_tokens=g,
        sampling=nn.Sampling(temperature=spec.temperature),
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    sampled = jnp.arange(g)[None, :] < length_B[:, None]
    tokens_BT = jnp.concatenate([tokens_BP, new_tokens], axis=1)
    segment_ids_BT = jnp.concatenate(
        [segment_ids_BP, jnp.where(sampled, segment_B[:, None], 0)], axis=1
    )
    pad_B1 = jnp.full((b, 1), pad_id, jnp.int32)
    zeros = jnp.zeros((b, p - 1), jnp.int32)
    batch = {
        "tokens": tokens_BT,
        "segment_ids": segment_ids_BT.astype(jnp.int32),
        # Position t predicts token t + 1: the sampled tokens are predicted from P - 1 on.
        "targets": jnp.concatenate([tokens_BT[:, 1:], pad_B1], axis=1),
        "loss_mask": jnp.concatenate(
            [zeros, sampled.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1
        ),
    }
    return batch, length_B


def make_sampler(
    graphdef,
    spec: OnPolicySpec,
    *,
    seq_len: int,
    eos_ids,
    pad_id: int,
    param_shardings,
    batch_sh: NamedSharding,
    from_file: bool,
):
    """Jitted sample(params, batch, key) -> (batch, float32[] mean sampled length).

    params: the student's (shardings `param_shardings`); batch: the step's training
    batch, or with `from_file` the prompts (`PromptFile.batch`). The output batch has
    the training batch's shape and sharding.
    """
    p = seq_len - spec.max_new_tokens
    replicated = NamedSharding(batch_sh.mesh, PartitionSpec())

    def sample(params, batch, key):
        model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
        cut_key, sample_key = jax.random.split(key)
        if from_file:
            prompts = (batch["tokens"], batch["segment_ids"], batch["positions"])
        else:
            prompts = cut_prompts(
                batch["tokens"],
                batch["segment_ids"],
                cut_key,
                prompt_len=p,
                min_prompt=spec.min_prompt,
            )
        prompts = [sharding.constrain(x, ("batch", "length")) for x in prompts]
        out, length_B = complete(
            model, *prompts, sample_key, spec=spec, eos_ids=tuple(eos_ids), pad_id=pad_id
        )
        return out, jnp.mean(length_B.astype(jnp.float32))

    return jax.jit(
        sample,
        in_shardings=(param_shardings, batch_sh, replicated),
        out_shardings=(batch_sh, replicated),
    )


class PromptFile:
    """Prompts from a JSONL file (one object per line, the text under `field`),
    tokenized once with the model's BOS convention; step s takes prompts s*B .. s*B + B
    - 1 (cycling). Every host reads the whole file and builds its own devices' rows."""

    def __init__(self, path, field: str, tokenizer, *, prompt_len: int, batch_sh, global_batch):
        path = epath.Path(path)
        if not path.exists():
            raise ConfigError(f"distill.on_policy.prompts={path} does not exist")
        if tokenizer is None:
            raise ConfigError("distill.on_policy.prompts needs data.tokenizer to tokenize them")
        self.prompts = []
        for n, text in data.strings(path, field):
            ids = tokenizer.encode(text)
            if not ids or len(ids) > prompt_len:
                raise DataError(
                    f"{path}:{n}: the prompt is {len(ids)} tokens; prompts must have 1 to "
                    f"{prompt_len} (data.seq_len minus distill.on_policy.max_new_tokens)"
                )
            self.prompts.append(ids)
        if not self.prompts:
            raise DataError(f"{path} holds no prompts")
        self.prompt_len, self.batch_sh, self.global_batch = prompt_len, batch_sh, global_batch

    def batch(self, step: int) -> dict[str, jax.Array]:
        """int32[B, P] tokens, segment_ids and positions of step `step`'s prompts."""
        b, p = self.global_batch, self.prompt_len
        arrays = {k: np.zeros((b, p), np.int32) for k in ("tokens", "segment_ids", "positions")}
        for row in range(b):
            ids = self.prompts[(step * b + row) % len(self.prompts)]
            arrays["tokens"][row, p - len(ids) :] = ids
            arrays["segment_ids"][row, p - len(ids) :] = 1
            arrays["positions"][row, p - len(ids) :] = np.arange(len(ids))
        sh = NamedSharding(self.batch_sh.mesh, self.batch_sh.spec)
        return {
            k: jax.make_array_from_callback((b, p), sh, lambda idx, a=a: a[idx])
            for k, a in arrays.items()
        }
