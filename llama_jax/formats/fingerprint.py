"""The identity of a frozen model (a distillation teacher, a LoRA base) as checkpoint
metadata records it: a hash of its config and per-parameter statistics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Relative tolerance when comparing two fingerprints' parameter statistics: sums taken
# on another mesh, or on the host, add in another order.
FINGERPRINT_RTOL = 1e-3


def config_digest(config) -> str:
    """sha256 of a LlamaConfig's fields."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


@jax.jit
def _stats(params):
    def one(x):
        x = x.astype(jnp.float32)
        return jnp.stack([jnp.sum(jnp.abs(x)), jnp.sum(jnp.square(x))])

    return jax.tree.map(one, params)


def fingerprint(config, params) -> dict[str, Any]:
    """The identity of a frozen model recorded in checkpoint metadata (a distillation
    teacher, a LoRA base): a hash of its LlamaConfig, and per-parameter float32 sums of
    |x| and x**2 taken on the devices, keyed by `jax.tree_util.keystr` paths."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_stats(params)))[0]
    return {
        "config_sha256": config_digest(config),
        "params": {jax.tree_util.keystr(k): [float(v) for v in np.asarray(x)] for k, x in flat},
    }


def fingerprint_key(dotted: str) -> str:
    """The fingerprint key of a dotted parameter path ('a.b' -> "['a']['b']")."""
    return "".join(f"[{part!r}]" for part in dotted.split("."))


def host_stats(x: np.ndarray) -> list[float]:
    """A fingerprint's statistics of one parameter held on the host."""
    x = np.asarray(x, np.float64)
    return [float(np.sum(np.abs(x))), float(np.sum(x * x))]


def same_stats(a, b) -> bool:
    """Whether two parameters' fingerprint statistics agree (up to FINGERPRINT_RTOL)."""
    return bool(np.allclose(a, b, rtol=FINGERPRINT_RTOL))


def fingerprint_mismatch(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """Why fingerprint `now` is of another model than `saved` ("another architecture",
    "other weights ([...] differ)"), or None when they match."""
    if saved["config_sha256"] != now["config_sha256"]:
        return "another architecture"
    a, b = saved["params"], now["params"]
    changed = [k for k in a if k not in b or not same_stats(a[k], b[k])]
    changed += [k for k in b if k not in a]
    if changed:
        return f"other weights ({changed[:3]} differ)"
    return None
