"""Magnitude pruning as an optax transformation whose state holds the masks.

`masked(inner, cfg, params)` wraps an optimizer (the whole clip + AdamW chain, so the
clipping norm sees the masked gradients). Its state is `PruneState(inner, masks,
count)`: a boolean mask (True = kept) for every pruned kernel, shaped and sharded like
the kernel, and the number of updates taken. At the schedule's points the masks are
recomputed from the current weights' magnitudes, and the inner state's entries of
newly pruned weights (Adam's moments) are zeroed. Every update masks the gradients
before the inner optimizer sees them and sets pruned weights to exactly zero, so the
moments of pruned entries stay zero and momentum never revives a weight.

Selection is exact: a schedule point with sparsity s prunes round(s * n) weights, n
being the matrix slice's size (per_layer) or all pruned weights together (global);
`select` finds them without sorting or gathering. N:M patterns keep the N largest
magnitudes of every M consecutive weights along a kernel's contracting (input) axis,
the layout sparse tensor cores use.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from llama_jax.compress import quant, select
from llama_jax.errors import ConfigError

# Kernels that can be pruned, with the axis of their stacked layout [L, in..., out...]
# along which N:M groups run (the last input axis: the one contiguous in the
# flattened input dimension). The LM head [D, V] is unstacked; it is viewed as [1, D, V].
PRUNABLE: dict[str, int] = {path: n for path, n in quant.QUANTIZED_KERNELS.items()}
PRUNABLE[quant.HEAD] = 1
DEFAULT_INCLUDE = r"layers\.(attn|mlp)\.\w+_proj\.kernel"
SCHEDULES = ("one_shot", "gradual")
SCOPES = ("global", "per_layer")
# Counts and flat indices are int32: one matrix slice must hold fewer weights.
MAX_SLICE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """sparsity: the final fraction of pruned weights in [0, 1); for an N:M pattern it
    is (M - N) / M (give that or 0). pattern: "unstructured" or "N:M" (e.g. "2:4").
    schedule: "one_shot" prunes at start_step; "gradual" follows Zhu & Gupta,
    s_t = s * (1 - (1 - (t - start) / (end - start))^3), recomputing the masks every
    update_every steps from start_step to end_step. scope: "global" (one threshold over
    every pruned matrix) or "per_layer" (each layer's matrix on its own). include: a
    regex matched (in full) against the prunable kernels' paths."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    schedule: str = "one_shot"
    scope: str = "global"
    start_step: int = 0
    end_step: int = 0
    update_every: int = 100
    include: str = DEFAULT_INCLUDE

    def __post_init__(self):
        nm = parse_pattern(self.pattern)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune sparsity={self.sparsity} must be in [0, 1)")
        if nm is not None:
            n, m = nm
            implied = (m - n) / m
            if self.sparsity not in (0.0, implied):
                raise ConfigError(
                    f"prune pattern {self.pattern} prunes {implied:g} of every group, but "
                    f"sparsity={self.sparsity}; give sparsity={implied:g} or 0"
                )
            if self.schedule != "one_shot":
                raise ConfigError(
                    f"prune pattern {self.pattern} is applied one-shot; schedule="
                    f"{self.schedule!r} needs an unstructured pattern"
                )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"prune schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.scope not in SCOPES:
            raise ConfigError(f"prune scope={self.scope!r}; expected one of {SCOPES}")
        if self.start_step < 0:
            raise ConfigError(f"prune start_step={self.start_step} must be >= 0")
        if self.schedule == "gradual":
            if self.end_step <= self.start_step:
                raise ConfigError(
                    f"gradual pruning needs end_step > start_step; got start_step="
                    f"{self.start_step}, end_step={self.end_step}"
                )
            if self.update_every < 1:
                raise ConfigError(f"prune update_every={self.update_every} must be >= 1")
        try:
            re.compile(self.include)
        except re.error as e:
            raise ConfigError(f"prune include={self.include!r} is not a regex: {e}") from None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def final_sparsity(self) -> float:
        nm = self.nm
        return self.sparsity if nm is None else (nm[1] - nm[0]) / nm[1]

    def points(self) -> list[int]:
        """The update counts at which masks are recomputed."""
        if self.schedule == "one_shot":
            return [self.start_step]
        pts = list(range(self.start_step, self.end_step, self.update_every))
        return pts + [self.end_step]

    def sparsity_at(self, point: int) -> float:
        if self.schedule == "one_shot":
            return self.final_sparsity
        progress = (point - self.start_step) / (self.end_step - self.start_step)
        return self.sparsity * (1.0 - (1.0 - min(max(progress, 0.0), 1.0)) ** 3)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for "N:M" (N kept of every M)."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise ConfigError(f"prune pattern={pattern!r}; expected 'unstructured' or 'N:M' (e.g. 2:4)")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ConfigError(f"prune pattern {pattern}: N={n} must satisfy 0 < N < M={m}")
    return n, m


def parse_prune(section: Mapping[str, Any] | None) -> PruneConfig | None:
    """A PruneConfig from a config's `prune` block; None when pruning is off (sparsity
    0 with the unstructured pattern)."""
    if section is None:
        return None
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"prune: unknown option(s) {unknown}; expected {sorted(fields)}")
    cfg = PruneConfig(**{k: section[k] for k in section})
    if cfg.sparsity == 0.0 and cfg.nm is None:
        return None
    return cfg


def pruned_paths(cfg: PruneConfig, params: Mapping[str, Any]) -> list[str]:
    """The dotted paths of the kernels `cfg` prunes in `params` (arrays or shapes),
    checked: at least one, N:M groups dividing their axis, slices within int32."""
    flat = traverse_util.flatten_dict(dict(params), sep=".")
    if any(k.endswith(quant.SCALE_SUFFIX) for k in flat):
        raise ConfigError("these parameters are int8-quantized; prune the float model first")
    candidates = [p for p in PRUNABLE if p in flat]
    paths = [p for p in candidates if re.fullmatch(cfg.include, p)]
    if not paths:
        raise ConfigError(
            f"prune include={cfg.include!r} matches no prunable kernel; the prunable ones "
            f"are {candidates} (embeddings and norms are never pruned)"
        )
    for path in paths:
        shape = _stacked_shape(path, flat[path].shape)
        if math.prod(shape[1:]) > MAX_SLICE:
            raise ConfigError(f"{path}: a slice of shape {shape[1:]} exceeds {MAX_SLICE} weights")
        if cfg.nm is not None:
            axis, m = PRUNABLE[path], cfg.nm[1]
            if shape[axis] % m:
                raise ConfigError(
                    f"{path}: contracting axis of size {shape[axis]} (shape {shape[1:]}) "
                    f"is not divisible by M={m} of pattern {cfg.pattern}"
                )
    return paths


def _stacked_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if path.startswith("layers.") else (1, *shape)


def _stacked(path: str, x: jax.Array) -> jax.Array:
    return x if path.startswith("layers.") else x[None]


def _unstacked(path: str, x: jax.Array) -> jax.Array:
    return x if path.startswith("layers.") else x[0]


class PruneState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    masks: Any  # nested dict: bool[...] per pruned kernel, True = kept
    count: jax.Array  # int32[], updates taken


def _target_counts(cfg: PruneConfig, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """int32[P, G] (high, low) halves of round(s * n) for each schedule point and
    group size n: exact integers computed here, in Python."""
    out = np.zeros((len(cfg.points()), len(sizes), 2), np.int32)
    for i, point in enumerate(cfg.points()):
        s = cfg.sparsity_at(point)
        for j, n in enumerate(sizes):
            k = min(math.floor(s * n + 0.5), n)
            out[i, j] = divmod(k, 1 << 16)
    return out[..., 0], out[..., 1]


def compute_masks(cfg: PruneConfig, params: Mapping[str, Any], paths: list[str], point: int):
    """Masks (nested dict of bool, True = kept) for `paths` at schedule point index
    `point` (int32[], traced or not), from the magnitudes in `params`."""
    flat = traverse_util.flatten_dict(dict(params), sep=".")
    ws = [_stacked(p, flat[p]) for p in paths]
    if cfg.nm is not None:
        n, m = cfg.nm
        axes = [PRUNABLE[p] for p in paths]
        pruned = [select.not_top_n_of_m(w, a, n, m) for w, a in zip(ws, axes, strict=True)]
    elif cfg.scope == "per_layer":
        sizes = [math.prod(w.shape[1:]) for w in ws]
        hi, lo = _target_counts(cfg, sizes)
        k = jnp.asarray(hi)[point] * (1 << 16) + jnp.asarray(lo)[point]  # int32[paths]
        pruned = select.smallest_per_layer(ws, [k[i] for i in range(len(ws))])
    else:
        hi, lo = _target_counts(cfg, [sum(math.prod(w.shape) for w in ws)])
        k = (jnp.asarray(hi)[point, 0], jnp.asarray(lo)[point, 0])
        pruned = select.smallest_overall(ws, k)
    masks = {p: _unstacked(p, ~x) for p, x in zip(paths, pruned, strict=True)}
    return traverse_util.unflatten_dict(masks, sep=".")


def _point_index(cfg: PruneConfig, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(whether `count` is a schedule point, its index) for an int32[] count."""
    pts = jnp.asarray(cfg.points(), jnp.int32)
    hit = pts == count
    return jnp.any(hit), jnp.argmax(hit)


def _full_masks(masks, params) -> Any:
    """The masks spread over the whole parameter tree, True (Python) where unpruned."""
    flat_m = traverse_util.flatten_dict(dict(masks), sep=".")
    flat_p = traverse_util.flatten_dict(dict(params), sep=".")
    full = {k: flat_m.get(k, True) for k in flat_p}
    return traverse_util.unflatten_dict(full, sep=".")


def apply_masks(tree, masks, params, fill=0.0):
    """tree (shaped like params) with pruned entries replaced by `fill` (a scalar or a
    tree like params)."""
    full = _full_masks(masks, params)
    fills = fill if isinstance(fill, Mapping) else jax.tree.map(lambda _: fill, params)
    return jax.tree.map(
        lambda x, m, f: x if m is True else jnp.where(m, x, jnp.asarray(f, x.dtype)),
        tree,
        full,
        fills,
    )


def masked(
    inner: optax.GradientTransformation, cfg: PruneConfig, params: Mapping[str, Any]
) -> optax.GradientTransformation:
    """Wraps `inner` so that the kernels `cfg` selects in `params` (arrays or shapes,
    used only for their paths and shapes) are pruned on `cfg`'s schedule."""
    paths = pruned_paths(cfg, params)

    def init(params):
        flat = traverse_util.flatten_dict(dict(params), sep=".")
        masks = {p: jnp.ones(flat[p].shape, jnp.bool_) for p in paths}
        return PruneState(
            inner=inner.init(params),
            masks=traverse_util.unflatten_dict(masks, sep="."),
            count=jnp.zeros((), jnp.int32),
        )

    def update(updates, state: PruneState, params=None):
        if params is None:
            raise ConfigError("pruning needs the parameters: call update(grads, state, params)")
        due, point = _point_index(cfg, state.count)

        def refresh(inner_state):
            masks = compute_masks(cfg, params, paths, point)
            # Newly pruned entries lose their history (Adam's moments) too.
            cleared = optax.tree_map_params(
                inner,
                lambda x, m: x if m is True else jnp.where(m, x, jnp.zeros((), x.dtype)),
                inner_state,
                _full_masks(masks, params),
            )
            return masks, cleared

        masks, inner_state = jax.lax.cond(due, refresh, lambda s: (state.masks, s), state.inner)
        grads = apply_masks(updates, masks, params)
        new_updates, inner_state = inner.update(grads, inner_state, params)
        # p + (-p) is exactly 0: pruned weights end the step at zero.
        new_updates = apply_masks(new_updates, masks, params, fill=_negated(params))
        return new_updates, PruneState(inner_state, masks, state.count + 1)

    return optax.GradientTransformation(init, update)


def _negated(params):
    return jax.tree.map(lambda p: -p, params)


def find_state(opt_state) -> PruneState | None:
    """The PruneState inside an optimizer state, if any."""
    if isinstance(opt_state, PruneState):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            found = find_state(s)
            if found is not None:
                return found
    return None


@jax.jit
def _mask_counts(flat_masks: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(float32[] pruned overall, float32[L] pruned per layer of the stacked kernels)."""
    overall = sum(jnp.sum(~m, dtype=jnp.float32) for m in flat_masks.values())
    stacked = [m for p, m in flat_masks.items() if p.startswith("layers.")]
    layers = sum((select.slice_sum(~m).astype(jnp.float32) for m in stacked), jnp.zeros(()))
    return overall, layers


def sparsity_report(masks) -> dict[str, float]:
    """Pruned fractions from the masks (nested dict of bool, True = kept, possibly
    sharded): `sparsity` over every pruned kernel, and `sparsity/layer_XX` per layer
    over the stacked kernels. Counted on the devices; only the counts are fetched."""
    flat = traverse_util.flatten_dict(dict(masks), sep=".")
    total = sum(int(np.size(m)) for m in flat.values())
    per_slice = sum(math.prod(m.shape[1:]) for p, m in flat.items() if p.startswith("layers."))
    overall, layers = jax.device_get(_mask_counts(flat))
    out = {"sparsity": float(overall) / max(total, 1)}
    for i, c in enumerate(np.atleast_1d(layers) if per_slice else []):
        out[f"sparsity/layer_{i:02d}"] = float(c) / per_slice
    return out
