"""Activation-based importance of a model's heads, MLP channels, embedding channels and
layers, measured on calibration batches (the ranking structured pruning slices by).

One instrumented forward pass per batch runs the model's own blocks, with taps on the
modules whose inputs or outputs are measured, and reduces what they see on the
devices to small float32 statistics:

  heads   [L, N]  the L2 norm over H of each head's attention output (o_proj's input)
  mlp     [L, F]  |silu(gate) * up| per channel (down_proj's input)
  embed   [L, D]  |RMSNorm output| per channel, the block's two norms added
  block_influence [L]  1 - cos(block input, block output) per token (ShortGPT)

Each token-level value is aggregated over the tokens of a row (`seq`: mean or L2),
then over every row of every batch (`batch`: mean or L2). Padding (segment id 0)
never counts. A second kind of pass, `layer_drop_losses`, measures the mean token loss
with each layer skipped in turn (Minitron's depth criterion).

Everything runs jitted on the parameters' mesh with the activations constrained by
the same logical rules as training, and the statistics come back replicated, so
every process sees the same scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax.errors import ConfigError, DataError
from llama_jax.nn import chunked_cross_entropy, segment_positions

AGGREGATIONS = ("mean", "l2")


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """How token-level values become one score per unit: over the tokens of each row
    (`seq`), then over all rows (`batch`). The default, mean over the sequence then L2
    over the batch, is what Minitron found best and NVIDIA's pruning code uses."""

    seq: str = "mean"
    batch: str = "l2"

    def __post_init__(self):
        for axis in ("seq", "batch"):
            value = getattr(self, axis)
            if value not in AGGREGATIONS:
                raise ConfigError(
                    f"{axis} aggregation={value!r} is unknown; expected one of {AGGREGATIONS}"
                )


@dataclasses.dataclass
class Scores:
    """Importance measured on calibration data (numpy, float32; higher = keep).

    heads[L, N], mlp[L, F], embed[L, D] (per layer; a channel's score is the sum over
    the layers kept), block_influence[L]; loss: the model's mean token loss on the
    batches; loss_without[L]: the same with each layer skipped (None when not
    measured); rows and tokens: what was measured.
    """

    heads: np.ndarray
    mlp: np.ndarray
    embed: np.ndarray
    block_influence: np.ndarray
    loss: float
    rows: int
    tokens: int
    loss_without: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-unit scores by name (what `importance.npz` stores)."""
        out = dict(
            heads=self.heads,
            mlp=self.mlp,
            embed=self.embed,
            block_influence=self.block_influence,
        )
        if self.loss_without is not None:
            out["loss_without"] = self.loss_without
        return out


class _Tap:
    """Stands in for a sub-module of a block while it runs: calls it and keeps its
    input (or output) in `sink[key]`, so the statistics come from the model's own
    code rather than a copy of it."""

    def __init__(self, inner, sink: dict, key: str, keep_input: bool):
        self.inner, self.sink, self.key, self.keep_input = inner, sink, key, keep_input

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        self.sink[self.key] = x if self.keep_input else y
        return y


def _row_stats(values_BTC: jax.Array, mask_BT: jax.Array, seq: str) -> tuple:
    """Token values float32[B, T, C] (>= 0) -> (sum over rows, sum of squares over
    rows) of each row's `seq` aggregate, float32[C] each. Masked tokens never count."""
    m = mask_BT.astype(jnp.float32)[..., None]
    v = jnp.where(m > 0, values_BTC, 0.0)
    if seq == "mean":
        per_row = jnp.sum(v, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    else:
        per_row = jnp.sqrt(jnp.sum(v * v, axis=1))
    return jnp.sum(per_row, axis=0), jnp.sum(per_row * per_row, axis=0)


def _finish(sums: np.ndarray, squares: np.ndarray, rows: int, batch: str) -> np.ndarray:
    if batch == "mean":
        return (sums / max(rows, 1)).astype(np.float32)
    return np.sqrt(squares).astype(np.float32)


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _check_batches(batches: list[Mapping[str, jax.Array]]) -> None:
    if not batches:
        raise DataError("importance needs at least one calibration batch; got none")
    missing = {"tokens", "segment_ids", "targets", "loss_mask"} - set(batches[0])
    if missing:
        raise DataError(f"calibration batches lack {sorted(missing)} (DataIterator batches)")


def _stats_fn(graphdef: nnx.GraphDef, seq: str, loss_chunk: int, mesh, rules) -> Callable:
    """jit(params, batch) -> dict of per-layer statistics (see `activation_scores`)."""

    def stats(params, batch):
        model = nnx.merge(graphdef, params)
        tokens, segments = batch["tokens"], batch["segment_ids"]
        mask_BT = segments > 0
        positions = segment_positions(segments)
        x = sharding.constrain(model.embed(tokens), ("batch", "length", "embed"))
        layers_graphdef, layer_params = nnx.split(model.layers)

        def body(x_BTD, p):
            block = nnx.merge(layers_graphdef, p)
            sink: dict[str, jax.Array] = {}
            block.attn_norm = _Tap(block.attn_norm, sink, "attn_norm", keep_input=False)
            block.mlp_norm = _Tap(block.mlp_norm, sink, "mlp_norm", keep_input=False)
            block.attn.o_proj = _Tap(block.attn.o_proj, sink, "heads", keep_input=True)
            block.mlp.down_proj = _Tap(block.mlp.down_proj, sink, "mlp", keep_input=True)
            y_BTD, _ = block(x_BTD, positions, segments, True)
            f32 = {k: v.astype(jnp.float32) for k, v in sink.items()}
            head_norms_BTN = jnp.sqrt(jnp.sum(f32["heads"] ** 2, axis=-1))
            out = {
                "heads": _row_stats(head_norms_BTN, mask_BT, seq),
                "mlp": _row_stats(jnp.abs(f32["mlp"]), mask_BT, seq),
                "attn_norm": _row_stats(jnp.abs(f32["attn_norm"]), mask_BT, seq),
                "mlp_norm": _row_stats(jnp.abs(f32["mlp_norm"]), mask_BT, seq),
            }
            a, b = x_BTD.astype(jnp.float32), y_BTD.astype(jnp.float32)
            cos_BT = jnp.sum(a * b, -1) / jnp.maximum(
                jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30
            )
            out["cos"] = jnp.sum(jnp.where(mask_BT, cos_BT, 0.0))
            return y_BTD, out

        x, per_layer = jax.lax.scan(body, x, layer_params)
        h = model.final_norm(x)
        loss, count = chunked_cross_entropy(
            h,
            lambda h_BCD: model.unembed(h_BCD, out_dtype=jnp.float32),
            batch["targets"],
            batch["loss_mask"],
            chunk=loss_chunk,
        )
        rows = jnp.sum(jnp.any(mask_BT, axis=1).astype(jnp.float32))
        tokens_seen = jnp.sum(mask_BT.astype(jnp.float32))
        return per_layer, loss, count, rows, tokens_seen

    def traced(params, batch):
        with sharding.activation_sharding(mesh, rules):
            return stats(params, batch)

    return jax.jit(traced, out_shardings=_replicated(mesh))


def activation_scores(
    graphdef: nnx.GraphDef,
    params: Mapping[str, Any],
    batches: Iterable[Mapping[str, jax.Array]],
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    aggregation: Aggregation = Aggregation(),
    loss_chunk: int = 512,
) -> Scores:
    """Head, MLP-channel, embedding-channel and block-influence scores of the model
    `nnx.merge(graphdef, params)` over `batches`.

    graphdef: a `Llama` graph definition (its dtype is the compute dtype), e.g. from
      `nn.abstract_params`; params: its parameters, sharded on `mesh`.
    batches: DataIterator batches, dicts of int32[B, T] tokens, segment_ids, targets,
      loss_mask. All statistics are reduced in float32 on the devices.
    """
    batches = list(batches)
    _check_batches(batches)
    fn = _stats_fn(graphdef, aggregation.seq, loss_chunk, mesh, rules)
    total = None
    loss = count = rows = tokens = 0.0
    for batch in batches:
        per_layer, b_loss, b_count, b_rows, b_tokens = jax.device_get(fn(params, batch))
        per_layer = jax.tree.map(lambda v: np.asarray(v, np.float64), per_layer)
        total = per_layer if total is None else jax.tree.map(np.add, total, per_layer)
        loss, count = loss + float(b_loss), count + float(b_count)
        rows, tokens = rows + float(b_rows), tokens + float(b_tokens)
    if tokens == 0:
        raise DataError("the calibration batches hold no tokens (every segment id is 0)")

    def score(name):
        sums, squares = total[name]
        return _finish(sums, squares, int(rows), aggregation.batch)

    return Scores(
        heads=score("heads"),
        mlp=score("mlp"),
        embed=score("attn_norm") + score("mlp_norm"),
        block_influence=(1.0 - total["cos"] / tokens).astype(np.float32),
        loss=loss / max(count, 1.0),
        rows=int(rows),
        tokens=int(tokens),
    )


def _drop_fn(graphdef: nnx.GraphDef, loss_chunk: int, mesh, rules) -> Callable:
    """jit(params, batch, keep float32[L]) -> (loss sum, count) with the layers whose
    keep is 0 skipped (their input passes straight on)."""

    def loss_without(params, batch, keep_L):
        model = nnx.merge(graphdef, params)
        tokens, segments = batch["tokens"], batch["segment_ids"]
        positions = segment_positions(segments)
        x = sharding.constrain(model.embed(tokens), ("batch", "length", "embed"))
        layers_graphdef, layer_params = nnx.split(model.layers)

        def body(x_BTD, xs):
            p, keep = xs
            y_BTD, _ = nnx.merge(layers_graphdef, p)(x_BTD, positions, segments, True)
            return jnp.where(keep > 0, y_BTD, x_BTD), None

        x, _ = jax.lax.scan(body, x, (layer_params, keep_L))
        return chunked_cross_entropy(
            model.final_norm(x),
            lambda h_BCD: model.unembed(h_BCD, out_dtype=jnp.float32),
            batch["targets"],
            batch["loss_mask"],
            chunk=loss_chunk,
        )

    def traced(params, batch, keep_L):
        with sharding.activation_sharding(mesh, rules):
            return loss_without(params, batch, keep_L)

    return jax.jit(traced, out_shardings=_replicated(mesh))


def layer_drop_losses(
    graphdef: nnx.GraphDef,
    params: Mapping[str, Any],
    batches: Iterable[Mapping[str, jax.Array]],
    num_layers: int,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    loss_chunk: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """float32[L]: the mean token loss over `batches` with layer l skipped, for each l
    (one compiled forward serves every l). progress(done, total) after each layer."""
    batches = list(batches)
    _check_batches(batches)
    fn = _drop_fn(graphdef, loss_chunk, mesh, rules)
    out = np.zeros(num_layers, np.float32)
    for layer in range(num_layers):
        keep = np.ones(num_layers, np.float32)
        keep[layer] = 0.0
        total = count = 0.0
        for batch in batches:
            s, c = jax.device_get(fn(params, batch, keep))
            total, count = total + float(s), count + float(c)
        out[layer] = total / max(count, 1.0)
        if progress is not None:
            progress(layer + 1, num_layers)
    return out
