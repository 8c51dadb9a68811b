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
being the matrix slice's size (per_layer) or all pruned weights together (global).
The k-th smallest magnitude is found by bisection over the float32 bit patterns
(magnitudes are non-negative, so their bits order like their values): each probe is a
count over the sharded arrays, a reduction the devices do where the data lives, and
no array is ever sorted or gathered. Ties at the threshold are broken by position
(layer, then row-major index), found by a second bisection.

N:M patterns keep the N largest magnitudes of every M consecutive weights along a
kernel's contracting (input) axis, the layout sparse tensor cores use.
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

from llama_jax.compress import quant
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


def _bits(w: jax.Array) -> jax.Array:
    """int32 bit patterns of |w| in float32: non-negative, ordered like the values."""
    return jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)


def _slice_sum(x: jax.Array) -> jax.Array:
    """int32[L] count of True per layer slice of a bool[L, ...]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """int32[L, ...] row-major position of every element within its layer slice."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return idx


def _bisect(count_le, lo, hi, steps: int):
    """The smallest v in (lo, hi] with count_le(v) true, count_le being monotone and
    true at hi. lo and hi are matching pytrees of int32 arrays (searched elementwise,
    all in one loop, which compiles faster than one loop each)."""

    def body(_, carry):
        lo, hi = carry
        mid = jax.tree.map(lambda a, b: a + (b - a) // 2, lo, hi)
        ok = count_le(mid)
        lo = jax.tree.map(lambda o, a, m: jnp.where(o, a, m), ok, lo, mid)
        hi = jax.tree.map(lambda o, m, b: jnp.where(o, m, b), ok, mid, hi)
        return lo, hi

    return jax.lax.fori_loop(0, steps, body, (lo, hi))[1]


_INF_BITS = 0x7F800000
_BIT_STEPS = 31  # covers (-1, _INF_BITS]


def _expand(x: jax.Array, ndim: int) -> jax.Array:
    """int32[L] -> int32[L, 1, ...] broadcasting against an [L, ...] array."""
    return x.reshape(x.shape + (1,) * (ndim - 1))


def _first_ties(ties: list[jax.Array], rs: list[jax.Array]) -> list[jax.Array]:
    """bool[L, ...] per array: the first r[l] True entries (row-major) of each layer
    slice of each `ties` array, rs being int32[L] per array."""
    idx = [_flat_index(t.shape) for t in ties]

    def enough(js):
        return [
            _slice_sum(t & (i <= _expand(j, t.ndim))) >= r
            for t, i, j, r in zip(ties, idx, js, rs, strict=True)
        ]

    lo = [jnp.full(r.shape, -1, jnp.int32) for r in rs]
    hi = [
        jnp.full(r.shape, math.prod(t.shape[1:]) - 1, jnp.int32)
        for t, r in zip(ties, rs, strict=True)
    ]
    steps = max(math.ceil(math.log2(math.prod(t.shape[1:]) + 1)) for t in ties)
    last = _bisect(enough, lo, hi, max(steps, 1))
    return [
        t & (i <= _expand(j, t.ndim)) & _expand(r > 0, t.ndim)
        for t, i, j, r in zip(ties, idx, last, rs, strict=True)
    ]


def _per_layer_prune(ws: list[jax.Array], ks: list[jax.Array]) -> list[jax.Array]:
    """bool[L, ...] per array, True where pruned: the k smallest magnitudes of each
    layer slice (ks: int32[] per array)."""
    bits = [_bits(w) for w in ws]
    lo = [jnp.full(w.shape[:1], -1, jnp.int32) for w in ws]
    hi = [jnp.full(w.shape[:1], _INF_BITS, jnp.int32) for w in ws]

    def enough(vs):
        return [
            _slice_sum(b <= _expand(v, b.ndim)) >= k for b, v, k in zip(bits, vs, ks, strict=True)
        ]

    ts = _bisect(enough, lo, hi, _BIT_STEPS)
    below = [b < _expand(t, b.ndim) for b, t in zip(bits, ts, strict=True)]
    need = [k - _slice_sum(x) for k, x in zip(ks, below, strict=True)]
    ties = _first_ties([b == _expand(t, b.ndim) for b, t in zip(bits, ts, strict=True)], need)
    return [x | y for x, y in zip(below, ties, strict=True)]


# Counts over all pruned weights can pass 2**31, so the global scope adds them as
# (high, low) int32 pairs: value = high * 2**16 + low, low in [0, 2**16).
def _wide(c: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    hi = jnp.sum(c >> 16, axis=axis, dtype=jnp.int32)
    lo = jnp.sum(c & 0xFFFF, axis=axis, dtype=jnp.int32)
    return hi + (lo >> 16), lo & 0xFFFF


def _wide_ge(a, b) -> jax.Array:
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] >= b[1]))


def _wide_sub(a, b) -> tuple[jax.Array, jax.Array]:
    hi, lo = a[0] - b[0], a[1] - b[1]
    borrow = lo < 0
    return hi - borrow.astype(jnp.int32), jnp.where(borrow, lo + (1 << 16), lo)


def _wide_clip(a, upper: jax.Array) -> jax.Array:
    """min(max(a, 0), upper) as int32, upper being int32."""
    hi, lo = a
    small = jnp.minimum(jnp.clip(hi, 0, (1 << 15) - 1) * (1 << 16) + lo, upper)
    return jnp.where(hi < 0, 0, jnp.where(hi >= 1 << 15, upper, small))


def _global_prune(ws: list[jax.Array], k) -> list[jax.Array]:
    """bool[L, ...] per array, True where pruned: the k smallest magnitudes over all of
    them together (k a (high, low) pair); ties go to the earlier array, layer, index."""
    bits = [_bits(w) for w in ws]

    def count(pred) -> tuple[jax.Array, jax.Array]:
        return _wide(jnp.concatenate([_slice_sum(pred(b)) for b in bits]))

    t = _bisect(
        lambda v: _wide_ge(count(lambda b: b <= v), k),
        jnp.int32(-1),
        jnp.int32(_INF_BITS),
        _BIT_STEPS,
    )
    need = _wide_sub(k, count(lambda b: b < t))
    ties = jnp.concatenate([_slice_sum(b == t) for b in bits])  # int32[S], S = all slices
    # Ties before each slice, as (high, low) pairs: cumulative sums of both halves.
    cum_hi = jnp.cumsum(ties >> 16) - (ties >> 16)
    cum_lo = jnp.cumsum(ties & 0xFFFF) - (ties & 0xFFFF)
    before = (cum_hi + (cum_lo >> 16), cum_lo & 0xFFFF)
    r = _wide_clip(_wide_sub((need[0], need[1]), before), ties)
    bounds = np.cumsum([0] + [b.shape[0] for b in bits])
    rs = [r[bounds[i] : bounds[i + 1]] for i in range(len(bits))]
    chosen = _first_ties([b == t for b in bits], rs)
    return [(b < t) | c for b, c in zip(bits, chosen, strict=True)]


def _nm_prune(w: jax.Array, axis: int, n: int, m: int) -> jax.Array:
    """bool[L, ...] True where pruned: in every M consecutive entries along `axis`, all
    but the N largest magnitudes (ties keep the earlier entry)."""
    mag = jnp.abs(w.astype(jnp.float32))
    shape = mag.shape
    g = mag.reshape(*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])
    pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, axis + 1)
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        other = jax.lax.slice_in_dim(g, j, j + 1, axis=axis + 1)
        beats = (other > g) | ((other == g) & (j < pos))
        rank = rank + beats.astype(jnp.int32)
    return (rank >= n).reshape(shape)


def compute_masks(cfg: PruneConfig, params: Mapping[str, Any], paths: list[str], point: int):
    """Masks (nested dict of bool, True = kept) for `paths` at schedule point index
    `point` (int32[], traced or not), from the magnitudes in `params`."""
    flat = traverse_util.flatten_dict(dict(params), sep=".")
    ws = [_stacked(p, flat[p]) for p in paths]
    if cfg.nm is not None:
        n, m = cfg.nm
        pruned = [_nm_prune(w, PRUNABLE[p], n, m) for p, w in zip(paths, ws, strict=True)]
    elif cfg.scope == "per_layer":
        sizes = [math.prod(w.shape[1:]) for w in ws]
        hi, lo = _target_counts(cfg, sizes)
        k = jnp.asarray(hi)[point] * (1 << 16) + jnp.asarray(lo)[point]  # int32[paths]
        pruned = _per_layer_prune(ws, [k[i] for i in range(len(ws))])
    else:
        hi, lo = _target_counts(cfg, [sum(math.prod(w.shape) for w in ws)])
        k = (jnp.asarray(hi)[point, 0], jnp.asarray(lo)[point, 0])
        pruned = _global_prune(ws, k)
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
    layers = sum((_slice_sum(~m).astype(jnp.float32) for m in stacked), jnp.zeros(()))
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
