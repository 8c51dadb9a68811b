"""Parameter trees as flat dicts keyed by dotted paths ('layers.attn.q_proj.kernel'),
the form checkpoints, key maps and file formats use, and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested mapping keyed by their dotted paths."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= flatten(v, key + ".") if isinstance(v, Mapping) else {key: v}
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of a flat one keyed by dotted paths."""
    return traverse_util.unflatten_dict(dict(flat), sep=".")
