"""Device meshes and the one table that maps logical axis names to mesh axes.

Mesh axes, outermost first: `dcn` (data parallel across slices, over the data-centre
network), `data` (data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (tensor parallel: heads, MLP hidden and vocabulary split).

Layers name their dimensions logically (`embed`, `heads`, ...); `DEFAULT_RULES` says
which mesh axes each name is split over. A dimension that its mesh axes do not divide
is replicated on them instead, and this is logged once per (name, size).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx, traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import ConfigError

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

DEFAULT_RULES: Rules = (
    ("batch", ("dcn", "data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(
    num_devices: int, *, data: int = 1, fsdp: int = -1, tensor: int = 1, dcn: int = 1
) -> dict[str, int]:
    """Resolves one -1 entry so the ICI axes multiply to num_devices / dcn."""
    sizes = {"dcn": dcn, "data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh axis {name}={size}; expected a positive size or -1")
    if dcn == -1:
        raise ConfigError("mesh axis dcn=-1 is not allowed; give the number of slices")
    if num_devices % dcn:
        raise ConfigError(f"{num_devices} devices do not split into dcn={dcn} slices")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise ConfigError(
                f"mesh {sizes}: the fixed axes ({known} devices) do not divide "
                f"the {num_devices} devices"
            )
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices; "
            f"expected the {num_devices} available"
        )
    return sizes


def create_mesh(
    *,
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    dcn: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with axes MESH_AXES. With dcn > 1 the devices are grouped by slice
    (hybrid ICI/DCN mesh), so only the dcn axis crosses slices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(len(devices), data=data, fsdp=fsdp, tensor=tensor, dcn=dcn)
    ici = [sizes["data"], sizes["fsdp"], sizes["tensor"]]
    if dcn > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            [1, *ici], [dcn, 1, 1, 1], devices=devices, allow_split_physical_axes=True
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh([1, *ici], devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topologies the helper cannot tile (e.g. fake CPU devices): plain order.
            grid = np.asarray(devices).reshape([1, *ici])
    return Mesh(grid, MESH_AXES)


def parse_rules(spec: str) -> dict[str, tuple[str, ...] | None]:
    """'vocab=fsdp,mlp=tensor+fsdp,embed=' -> logical-axis overrides ('' replicates)."""
    out: dict[str, tuple[str, ...] | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ConfigError(f"mesh rule {item!r}; expected NAME=AXIS[+AXIS...]")
        name, axes = (s.strip() for s in item.split("=", 1))
        out[name] = tuple(a for a in axes.split("+") if a) or None
    return out


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=-1,tensor=2' -> create_mesh keyword arguments (axes not named keep their
    defaults: dcn=1, data=1, fsdp=-1, tensor=1)."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, size = item.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ConfigError(f"mesh axis {name!r} in {spec!r}; expected one of {MESH_AXES}")
        try:
            out[name] = int(size)
        except ValueError:
            raise ConfigError(f"mesh size {item!r}; expected AXIS=INTEGER (-1: the rest)") from None
    return out


def _rules_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"rule {name!r} -> {axes} names unknown mesh axes {unknown}; "
                f"expected some of {MESH_AXES}"
            )
        table[name] = tuple(axes)
    return table


def axis_size(mesh: Mesh, rules: Rules, name: str) -> int:
    """How many ways the mesh splits a dimension with this logical name (at most)."""
    return math.prod(mesh.shape[a] for a in _rules_table(rules).get(name, ()))


_logged: set[tuple] = set()


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    A mesh axis is used at most once per array (first dimension wins); a dimension its
    mesh axes do not divide is replicated, logged once.
    """
    table = _rules_table(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
        split = math.prod(mesh.shape[a] for a in axes)
        if axes and size % split:
            key = (name, size, axes)
            if key not in _logged:
                _logged.add(key)
                logging.info(
                    "logical axis %r of size %d is not divisible by mesh axes %s (%d); "
                    "replicating it there",
                    name,
                    size,
                    axes,
                    split,
                )
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every Variable of an (abstract) NNX state, from its logical
    `out_sharding` names. Variables without names are replicated."""

    def one(var):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_arrays(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """An (abstract) NNX state as a nested dict of ShapeDtypeStructs carrying the
    shardings `state_shardings` gives them."""
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    return jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
        nnx.to_pure_dict(state),
        shardings,
    )


def create_sharded(
    make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> nnx.Module:
    """Builds a module with every parameter created directly in its shards: the
    structure comes from `nnx.eval_shape`, the values from a jit with out_shardings, so
    no host ever holds a full copy."""
    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    def init():
        return nnx.split(make())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def build_sharded(shape, sharding_, read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array in `sharding_` from `read(index)`, which returns one device's
    slice as a new numpy array; each process reads only its own devices' slices.

    Like `jax.make_array_from_callback`, but each slice is handed to its device without
    a second host copy where the device is the host (CPU): a converting host then
    holds each parameter once, not twice.
    """
    shards = []
    for device, index in sharding_.addressable_devices_indices_map(shape).items():
        host = read(index)
        shards.append(jax.device_put(host, device, donate=device.platform == "cpu"))
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding_, shards)


def sharded_arrays(
    abstract: Mapping[str, Any], read: Callable[[str, tuple[slice, ...], Any], np.ndarray]
) -> Iterator[tuple[str, jax.Array]]:
    """Lazily builds each parameter of `abstract` (a nested dict of ShapeDtypeStructs
    with shardings) with `build_sharded` from `read(dotted path, index, dtype)`, which
    returns one device's slice. Yields (dotted path, array) in `abstract`'s order."""
    for path, leaf in traverse_util.flatten_dict(dict(abstract), sep=".").items():
        yield (
            path,
            build_sharded(
                leaf.shape, leaf.sharding, lambda idx, n=path, dt=leaf.dtype: read(n, idx, dt)
            ),
        )


def rules_from_config(overrides: Mapping[str, str | Sequence[str] | None] | None) -> Rules:
    """DEFAULT_RULES with some logical names remapped (e.g. from a config file)."""
    table = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        if name not in table:
            raise ConfigError(
                f"rule override for unknown logical axis {name!r}; known {sorted(table)}"
            )
        table[name] = axes
    rules = tuple(table.items())
    _rules_table(rules)
    return rules


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "llama_jax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context (while tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, or None outside one.
    Kernels that cannot be partitioned automatically (Pallas) use it to run under
    `shard_map` with the activations' own partitioning."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
