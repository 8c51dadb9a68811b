"""Generation: one jitted prefill, then a decode loop that stays on the device.

Prompts of different lengths are left-padded into one [B, T] batch (padding has
segment id 0, so nothing attends to it) and every row's positions start at 0, so a
padded row computes what it would alone. The decode loop is a `lax.while_loop` over
a static-shape KV cache: no Python runs per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from llama_jax import sharding
from llama_jax.errors import ConfigError
from llama_jax.nn.model import Llama
from llama_jax.nn.signatures import Int, checked

_PAD_MULTIPLE = 16  # prompt lengths are rounded up to this to reuse compilations


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")


def sample_logits(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Picks one token per row. logits: float[B, V] -> int32[B]. Filters run in float32."""
    logits = logits_BV.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@checked
def decode(
    model: Llama,
    tokens_BT: Int[jax.Array, "B T"],
    segment_ids_BT: Int[jax.Array, "B T"],
    positions_BT: Int[jax.Array, "B T"],
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[Int[jax.Array, "B new"], Int[jax.Array, " B"]]:
    """The prefill and decode loop every generation runs (traced: call it under jit).

    tokens, segment_ids, positions: int32[B, T] prompts aligned to the right (padding,
    segment id 0, on the left). Each row continues its last prompt token's segment and
    position; a row whose prompt is all padding samples nothing. The new token i of
    every row is drawn with key fold_in(key, i). Returns (new tokens int32[B,
    max_new_tokens], pad_id after a row's EOS; lengths int32[B], each row's sampled
    tokens with its EOS); the new tokens' dimension has no letter (`new` in the
    annotations). The loop is a `lax.while_loop` over a static-shape KV cache that stops
    once every row is done.
    """
    b, t = tokens_BT.shape
    cache = model.init_cache(b, t + max_new_tokens)
    h_BTD, cache = model.hidden_states(
        tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache=cache
    )
    segment_B, position_B = segment_ids_BT[:, -1], positions_BT[:, -1]
    empty_B = segment_B == 0
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    # Right alignment puts every row's last prompt token in the last slot.
    first = sample_logits(model.unembed(h_BTD[:, -1:])[:, 0], jax.random.fold_in(key, 0), sampling)
    first = jnp.where(empty_B, pad_id, first)
    new_tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done_B = empty_B | jnp.isin(first, eos)
    length_B = (~empty_B).astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok_B, cache, out, done, length = carry
        logits, cache = model(
            tok_B[:, None],
            positions_BT=(position_B + i)[:, None],
            segment_ids_BT=segment_B[:, None],
            cache=cache,
        )
        new = sample_logits(logits[:, 0], jax.random.fold_in(key, i), sampling)
        new = jnp.where(done, pad_id, new)
        out = out.at[:, i].set(new)
        return i + 1, new, cache, out, done | jnp.isin(new, eos), length + (~done)

    carry = (jnp.int32(1), first, cache, new_tokens, done_B, length_B)
    _, _, _, new_tokens, _, length_B = jax.lax.while_loop(cond, body, carry)
    return new_tokens, length_B


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id")
)
def _generate_jit(graphdef, state, tokens_BT, segment_ids_BT, positions_BT, key, **kwargs):
    model = nnx.merge(graphdef, state)
    return decode(model, tokens_BT, segment_ids_BT, positions_BT, key, **kwargs)[0]


def check_length(prompt_len: int, max_new_tokens: int, max_position_embeddings: int) -> None:
    """Raises ConfigError if a prompt of prompt_len tokens and max_new_tokens new ones go past
    the model's positions (the KV cache would be sized for all of them)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if prompt_len + max_new_tokens > max_position_embeddings:
        room = max_position_embeddings - prompt_len
        fix = (
            f"lower max_new_tokens to at most {room}"
            if room > 0
            else "shorten the prompt (it alone fills the context)"
        )
        raise ConfigError(
            f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} is "
            f"{prompt_len + max_new_tokens} positions, more than the model's "
            f"max_position_embeddings={max_position_embeddings}; {fix}"
        )


@checked
def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    seed: int = 0,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> list[list[int]]:
    """Continues each prompt (a list of token ids) by up to max_new_tokens tokens.

    A row stops after its first token in eos_ids (default: the config's), which is kept
    in its output. The longest prompt plus max_new_tokens must fit the model's
    max_position_embeddings (`check_length`), else ConfigError before anything compiles.
    Returns the new tokens of each row. Deterministic for a given seed. A model sharded
    over a mesh runs with its activations sharded by `rules`.
    """
    config = model.config
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not prompts:
        raise ConfigError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty; it needs at least one token (e.g. BOS)")
        bad = [x for x in p if not 0 <= int(x) < config.vocab_size]
        if bad:
            raise ConfigError(
                f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                f"[0, {config.vocab_size})"
            )
    check_length(max(len(p) for p in prompts), max_new_tokens, config.max_position_embeddings)
    eos_ids = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    t = -(-max(len(p) for p in prompts) // _PAD_MULTIPLE) * _PAD_MULTIPLE
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    segments = np.zeros((len(prompts), t), np.int32)
    positions = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :] = p
        segments[i, t - len(p) :] = 1
        positions[i, t - len(p) :] = np.arange(len(p))

    graphdef, state = nnx.split(model)
    mesh = _mesh_of(state)
    # On a mesh, the step is traced under its activation sharding, so kernels that must
    # run under shard_map (splash attention in the prefill) see the mesh.
    context = (
        contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh, rules)
    )
    with context:
        out = _generate_jit(
            graphdef,
            state,
            jnp.asarray(tokens),
            jnp.asarray(segments),
            jnp.asarray(positions),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_ids=eos_ids,
            pad_id=int(pad_id),
        )
    results = []
    for row in np.asarray(out).tolist():
        stop = next((j + 1 for j, x in enumerate(row) if x in eos_ids), len(row))
        results.append(row[:stop])
    return results


def _mesh_of(state) -> jax.sharding.Mesh | None:
    """The mesh a model's parameters are sharded over, if it has more than one device."""
    for leaf in jax.tree.leaves(state):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None
