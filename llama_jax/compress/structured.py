"""Structured pruning (the Minitron recipe): rank heads, MLP channels, embedding
channels and layers by their activations on calibration data (`importance`), keep the
most important ones up to target sizes, and slice them out into a smaller dense model.

What is kept:
  layers      the L' most important (loss increase when skipped, or block influence),
              in their original order
  heads       GQA groups stay whole: in every kept layer, each kv head keeps its G'
              best query heads (N' = K' * G', G' <= G), and the K' groups whose kept
              heads score highest survive with their kv head
  mlp         the F' channels of each kept layer with the highest scores
  embed       the D' channels with the highest score summed over the kept layers,
              sliced everywhere D appears (embedding, norms, every projection, the
              untied LM head; a tied head goes with the embedding)

RoPE and the head dim are untouched. Width is sliced per layer from the scores of the
full model, measured in one calibration pass.

`prune_params` works on parameters already on a mesh (what a distillation recipe
holds); reading and writing model directories is `structured_dir`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from llama_jax import data, nn, sharding, tree
from llama_jax.compress import importance
from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError, DataError
from llama_jax.nn import Llama

LAYER_METRICS = ("ppl", "block_influence")
TARGETS = ("num_layers", "num_heads", "num_kv_heads", "mlp_dim", "embed_dim")
# Written beside a pruned model's weights: every score and the indices kept.
SCORES_FILE = "importance.npz"
# Logical axis names of D (a norm's scale is D long).
_EMBED_AXES = ("embed", "norm")


@dataclasses.dataclass(frozen=True)
class StructuredConfig:
    """Target sizes (0 keeps the source's), calibration data and scoring options.

    calibration_data: a text, JSONL or .npy tokens file ('' in a run: the run's own
      data); calibration_format: '' picks it from the suffix (.jsonl/.json, .npy,
      else text). calibration_batches of calibration_batch_size rows of
      calibration_seq_len tokens are measured. seq_aggregation / batch_aggregation:
      see `importance.Aggregation`. layer_metric: 'ppl' ranks layers by the loss
      increase when each is skipped (one extra forward per layer), 'block_influence'
      by 1 - cos(input, output) (free).
    """

    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    mlp_dim: int = 0
    embed_dim: int = 0
    calibration_data: str = ""
    calibration_format: str = ""
    calibration_field: str = "text"
    calibration_batches: int = 16
    calibration_batch_size: int = 8
    calibration_seq_len: int = 1024
    seq_aggregation: str = "mean"
    batch_aggregation: str = "l2"
    layer_metric: str = "ppl"

    def __post_init__(self):
        for name in TARGETS:
            _check_int(name, getattr(self, name), 0)
        _check_int("calibration_batches", self.calibration_batches, 1)
        _check_int("calibration_batch_size", self.calibration_batch_size, 1)
        _check_int("calibration_seq_len", self.calibration_seq_len, 2)
        if self.calibration_format not in ("", *data.FORMATS):
            raise DataError(
                f"calibration_format={self.calibration_format!r}; expected '' (from the "
                f"suffix) or one of {data.FORMATS}"
            )
        if self.layer_metric not in LAYER_METRICS:
            raise ConfigError(
                f"layer_metric={self.layer_metric!r}; expected one of {LAYER_METRICS}"
            )
        self.aggregation()

    def targets(self) -> dict[str, int]:
        """The target sizes that were given."""
        return {k: getattr(self, k) for k in TARGETS if getattr(self, k)}

    def aggregation(self) -> importance.Aggregation:
        return importance.Aggregation(seq=self.seq_aggregation, batch=self.batch_aggregation)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r}; expected an integer >= {low}")


def parse_structured(section: Mapping[str, Any] | None) -> StructuredConfig | None:
    """A StructuredConfig from a config's `structured` block; None when it is absent or
    sets no target (structured pruning off)."""
    if section is None:
        return None
    fields = {f.name for f in dataclasses.fields(StructuredConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"structured: unknown option(s) {unknown}; expected {sorted(fields)}")
    cfg = StructuredConfig(**dict(section))
    return cfg if cfg.targets() else None


def target_config(config: LlamaConfig, spec: StructuredConfig) -> LlamaConfig:
    """The pruned architecture: `config` with the targets of `spec`, checked (no target
    larger than the source, GQA groups whole). RoPE and the head dim are kept.

    Given only num_heads, every kv head is kept when num_heads is a multiple of them
    (fewer query heads per kv head), else whole groups are dropped; given only
    num_kv_heads, each keeps all its query heads."""
    targets = spec.targets()
    if not targets:
        raise ConfigError(
            f"structured pruning needs at least one target size: some of {list(TARGETS)}"
        )
    for name, value in targets.items():
        if value > getattr(config, name):
            raise ConfigError(
                f"{name}={value} is larger than the source's {getattr(config, name)}; "
                "structured pruning only removes"
            )
    n, k = _heads_target(config, targets.get("num_heads"), targets.get("num_kv_heads"))
    return config.replace(
        num_layers=targets.get("num_layers", config.num_layers),
        num_heads=n,
        num_kv_heads=k,
        mlp_dim=targets.get("mlp_dim", config.mlp_dim),
        embed_dim=targets.get("embed_dim", config.embed_dim),
    )


def _heads_target(config: LlamaConfig, n: int | None, k: int | None) -> tuple[int, int]:
    big_k, g = config.num_kv_heads, config.q_per_kv
    if n is None and k is None:
        return config.num_heads, big_k
    if k is None:
        if n % big_k == 0:
            k = big_k
        elif n % g == 0:
            k = n // g
        else:
            raise ConfigError(
                f"num_heads={n} cannot keep GQA groups whole: the source has "
                f"num_kv_heads={big_k} with {g} query heads each, so num_heads must be a "
                f"multiple of {big_k} (fewer query heads per kv head) or of {g} (fewer "
                "groups); or give num_kv_heads too"
            )
    if n is None:
        n = k * g
    if n % k:
        raise ConfigError(f"num_heads={n} is not a multiple of num_kv_heads={k} (GQA)")
    if n // k > g:
        raise ConfigError(
            f"num_heads={n} over num_kv_heads={k} is {n // k} query heads per kv head, but "
            f"each kv head has {g} in the source and keeps only its own"
        )
    return n, k


@dataclasses.dataclass
class Kept:
    """What survives, as indices into the source (int32, increasing within each row):
    layers[L'], kv_heads[L', K'], heads[L', N'], mlp[L', F'] (per kept layer), embed[D']."""

    layers: np.ndarray
    kv_heads: np.ndarray
    heads: np.ndarray
    mlp: np.ndarray
    embed: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"kept_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores in increasing order; ties keep the lower index."""
    return np.sort(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]).astype(np.int32)


def layer_importance(scores: importance.Scores, metric: str) -> np.ndarray:
    """float[L], higher = keep: the loss increase when the layer is skipped ('ppl'), or
    its block influence."""
    if metric == "ppl":
        if scores.loss_without is None:
            raise ConfigError("layer_metric='ppl' needs the layer-drop losses; none measured")
        return scores.loss_without - scores.loss
    return scores.block_influence


def choose(
    source: LlamaConfig, target: LlamaConfig, scores: importance.Scores, layer_metric: str
) -> Kept:
    """The units to keep for `target` from the scores of the `source` model."""
    if target.num_layers < source.num_layers:
        layers = _top(layer_importance(scores, layer_metric), target.num_layers)
    else:
        layers = np.arange(source.num_layers, dtype=np.int32)
    g, g_new = source.q_per_kv, target.q_per_kv
    kv_rows, head_rows, mlp_rows = [], [], []
    for layer in layers:
        by_group = scores.heads[layer].reshape(source.num_kv_heads, g)
        within = [_top(s, g_new) for s in by_group]
        group_scores = [float(s[i].sum()) for s, i in zip(by_group, within, strict=True)]
        groups = _top(np.asarray(group_scores), target.num_kv_heads)
        kv_rows.append(groups)
        head_rows.append(np.concatenate([kv * g + within[kv] for kv in groups]).astype(np.int32))
        mlp_rows.append(_top(scores.mlp[layer], target.mlp_dim))
    embed = _top(scores.embed[layers].sum(axis=0), target.embed_dim)
    return Kept(
        layers=layers,
        kv_heads=np.stack(kv_rows),
        heads=np.stack(head_rows),
        mlp=np.stack(mlp_rows),
        embed=embed,
    )


def axis_names(config: LlamaConfig) -> dict[str, tuple[str | None, ...]]:
    """The logical axis names of every parameter, by dotted path."""
    state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))[1]
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): tuple(
            var.get_metadata().get("out_sharding") or ()
        )
        for path, var in leaves
    }


def _slice_one(names: tuple, x, layers, per_layer: Mapping[str, jax.Array], embed):
    """One parameter with its layers, embedding channels and per-layer units taken."""
    for axis, name in enumerate(names):
        if name == "layers":
            x = jnp.take(x, layers, axis=axis)
        elif name in _EMBED_AXES:
            x = jnp.take(x, embed, axis=axis)
    for axis, name in enumerate(names):
        if name in per_layer:
            # Stacked parameters lead with the layer axis; each layer takes its own units.
            x = jax.vmap(lambda w, i, a=axis - 1: jnp.take(w, i, axis=a))(x, per_layer[name])
    return x


def slice_params(
    params: Mapping[str, Any],
    source: LlamaConfig,
    kept: Kept,
    abstract: Mapping[str, Any],
) -> dict[str, Any]:
    """The kept slices of `params` (the `source` model's), in the dtypes and shardings of
    `abstract` (the pruned model's `nn.abstract_params`). One parameter at a time,
    each in its own jit, so the only temporaries are one parameter's."""
    names = axis_names(source)
    index = dict(
        layers=jnp.asarray(kept.layers),
        per_layer={
            "heads": jnp.asarray(kept.heads),
            "kv_heads": jnp.asarray(kept.kv_heads),
            "mlp": jnp.asarray(kept.mlp),
        },
        embed=jnp.asarray(kept.embed),
    )
    source_flat = tree.flatten(params)
    out = {}
    for path, target in tree.flatten(abstract).items():
        fn = _slicer(names[path], jnp.dtype(target.dtype), target.sharding)
        out[path] = fn(source_flat[path], index)
        if out[path].shape != target.shape:
            raise ValueError(f"{path}: sliced to {out[path].shape}, expected {target.shape}")
    return tree.nest(out)


@functools.lru_cache(maxsize=64)
def _slicer(names: tuple, dtype, out_sharding) -> Callable:
    """The jitted `_slice_one` for parameters with these axis names (shared by those
    of one shape, e.g. gate and up)."""

    def fn(x, idx):
        return _slice_one(names, x, idx["layers"], idx["per_layer"], idx["embed"]).astype(dtype)

    return jax.jit(fn, out_shardings=out_sharding)


@dataclasses.dataclass
class Pruned:
    """A structured-pruning result: the new architecture, its parameters (None for a
    dry run), the scores of the source and what was kept."""

    config: LlamaConfig
    source_config: LlamaConfig
    spec: StructuredConfig
    scores: importance.Scores
    kept: Kept
    params: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The metadata.json 'structured' entry."""
        shape = lambda c: {k: getattr(c, k) for k in TARGETS}  # noqa: E731
        out = dict(
            targets=self.spec.targets(),
            source_shape=shape(self.source_config),
            shape=shape(self.config),
            num_params_source=self.source_config.num_params(),
            num_params=self.config.num_params(),
            aggregation=dict(seq=self.spec.seq_aggregation, batch=self.spec.batch_aggregation),
            layer_metric=self.spec.layer_metric,
            calibration=dict(
                path=self.spec.calibration_data,
                batches=self.spec.calibration_batches,
                batch_size=self.spec.calibration_batch_size,
                seq_len=self.spec.calibration_seq_len,
                rows=self.scores.rows,
                tokens=self.scores.tokens,
                loss=round(self.scores.loss, 6),
            ),
            kept_layers=[int(i) for i in self.kept.layers],
            block_influence=[round(float(v), 6) for v in self.scores.block_influence],
            scores_file=SCORES_FILE,
        )
        if self.scores.loss_without is not None:
            out["loss_without_layer"] = [round(float(v), 6) for v in self.scores.loss_without]
        return out


def prune_params(
    config: LlamaConfig,
    params: Mapping[str, Any],
    spec: StructuredConfig,
    batches: Sequence[Mapping[str, jax.Array]],
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    dtype=jnp.float32,
    param_dtype=None,
    loss_chunk: int = 512,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Pruned:
    """Structured pruning of in-memory parameters on `mesh` (left unchanged).

    config, params: the source model (float, sharded by `rules`, e.g. a distillation
      teacher). spec: targets and scoring options. batches: calibration batches
      (`calibration_batches`). dtype: the compute dtype of the calibration forward
      passes (their statistics are float32 whatever it is). param_dtype: the pruned
      parameters' dtype (default: the source's). dry_run: score and choose only.
    Returns a Pruned whose params are sharded for the pruned config on `mesh`.
    progress(done, total) is called after each layer-drop pass.
    """
    target = target_config(config, spec)
    if target.embed_dim % target.num_heads:
        # transformers' LlamaConfig refuses this even with an explicit head_dim.
        logging.warning(
            "embed_dim=%d is not a multiple of num_heads=%d: llama_jax runs the pruned "
            "model, but transformers will not load its export",
            target.embed_dim,
            target.num_heads,
        )
    source_dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype)
    graphdef, _ = nn.abstract_params(config, mesh, rules, dtype=dtype, param_dtype=source_dtype)
    common = dict(mesh=mesh, rules=rules, loss_chunk=loss_chunk)
    scores = importance.activation_scores(
        graphdef, params, batches, aggregation=spec.aggregation(), **common
    )
    if target.num_layers < config.num_layers and spec.layer_metric == "ppl":
        scores.loss_without = importance.layer_drop_losses(
            graphdef, params, batches, config.num_layers, progress=progress, **common
        )
    kept = choose(config, target, scores, spec.layer_metric)
    pruned = Pruned(config=target, source_config=config, spec=spec, scores=scores, kept=kept)
    if not dry_run:
        _, abstract = nn.abstract_params(
            target, mesh, rules, dtype=jnp.dtype(param_dtype or source_dtype)
        )
        pruned.params = slice_params(params, config, kept, abstract)
    return pruned


def describe(pruned: Pruned) -> str:
    """A plain-text report: shapes and parameter counts, the layer ranking, and per
    kept layer the kv and query heads kept and the share of the MLP score kept."""
    s, t, sc, kept = pruned.source_config, pruned.config, pruned.scores, pruned.kept
    shape = lambda c: (  # noqa: E731
        f"L={c.num_layers} N={c.num_heads} K={c.num_kv_heads} F={c.mlp_dim} D={c.embed_dim}"
    )
    lines = [
        f"source  {shape(s)}  {s.num_params():,} parameters",
        f"target  {shape(t)}  {t.num_params():,} parameters "
        f"({100 * t.num_params() / s.num_params():.1f}% of the source)",
        f"calibration: {sc.rows} rows, {sc.tokens:,} tokens, mean token loss "
        f"{sc.loss:.4f} (perplexity {np.exp(sc.loss):.2f})",
        "layers (higher = more important):",
        "  layer  block_influence  loss_without  kept",
    ]
    for i in range(s.num_layers):
        without = "-" if sc.loss_without is None else f"{sc.loss_without[i]:.4f}"
        mark = "yes" if i in kept.layers else "no"
        lines.append(f"  {i:<5}  {sc.block_influence[i]:<15.4f}  {without:<12}  {mark}")
    lines.append("kept layer: kv heads | query heads | share of MLP score kept")
    for row, layer in enumerate(kept.layers):
        mlp = sc.mlp[layer]
        share = float(mlp[kept.mlp[row]].sum() / max(mlp.sum(), 1e-30))
        lines.append(
            f"  {layer:<5} {kept.kv_heads[row].tolist()} | {kept.heads[row].tolist()} | {share:.3f}"
        )
    emb = sc.embed[kept.layers].sum(axis=0)
    dropped = np.setdiff1d(np.arange(s.embed_dim), kept.embed)
    lines.append(
        f"embedding channels: {t.embed_dim} of {s.embed_dim} kept, "
        f"{float(emb[kept.embed].sum() / max(emb.sum(), 1e-30)):.3f} of the score; "
        f"dropped {dropped[:16].tolist()}{' ...' if len(dropped) > 16 else ''}"
    )
    return "\n".join(lines)
