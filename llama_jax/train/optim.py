"""The optimizer: AdamW with clipping and a warmup-then-decay schedule, wrapped in
magnitude pruning when a run prunes."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from llama_jax import compress
from llama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping, after a linear warmup a cosine, linear or
    constant learning rate to `learning_rate * end_lr_ratio` at `total_steps`."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr decay={self.decay!r}; expected 'cosine', 'linear' or 'constant'")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        # warmup_steps > total_steps is allowed: short trial runs never reach the peak.
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and "
                f"total_steps={self.total_steps} >= 1"
            )
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")


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
    cfg: OptimizerConfig, prune_cfg: compress.PruneConfig | None, params
) -> optax.GradientTransformation:
    """`make_optimizer`, wrapped in magnitude pruning when prune_cfg is given (params:
    arrays or shapes, for their paths)."""
    tx = make_optimizer(cfg)
    return tx if prune_cfg is None else compress.masked(tx, prune_cfg, params)


def prune_metrics(opt_state) -> dict[str, float]:
    """Sparsity overall and per layer when the optimizer prunes, else nothing."""
    found = compress.find_state(opt_state)
    return {} if found is None else compress.sparsity_report(found.masks)
