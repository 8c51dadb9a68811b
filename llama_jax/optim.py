"""The optimizer: AdamW with clipping and a warmup-then-decay schedule, wrapped in
magnitude pruning when a run prunes."""

from __future__ import annotations

from typing import Any

import jax
import optax

from llama_jax import prune
from llama_jax.run_config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine or linear decay to lr * end_lr_ratio."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params) -> Any:
    """True for weights that take weight decay: not norm scales, not biases."""

    def keep(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        return not (any("norm" in k for k in keys) or keys[-1] == "bias")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked off norms and biases)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )


def build_optimizer(
    cfg: OptimizerConfig, prune_cfg: prune.PruneConfig | None, params
) -> optax.GradientTransformation:
    """`make_optimizer`, wrapped in magnitude pruning when prune_cfg is given (params:
    arrays or shapes, for their paths)."""
    tx = make_optimizer(cfg)
    return tx if prune_cfg is None else prune.masked(tx, prune_cfg, params)


def prune_metrics(opt_state) -> dict[str, float]:
    """Sparsity overall and per layer when the optimizer prunes, else nothing."""
    found = prune.find_state(opt_state)
    return {} if found is None else prune.sparsity_report(found.masks)
