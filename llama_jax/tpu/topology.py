"""TPU slices to compile for: Cloud TPU names and libtpu topologies, their chips and HBM.

`tpu_target("v5p-64")` names the chips of a TPU slice that this host need not have:
libtpu's compiler runs on a CPU host and `jax.experimental.topologies` gives abstract
chips to build a mesh over. `local_target()` names this host's own TPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax

from llama_jax.errors import ConfigError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: Cloud TPU names count `cores_per_chip` per chip; `dims` is the
    rank of its topology (v4/v5p 3-D tori, v5e/v6e 2-D)."""

    name: str
    dims: int
    cores_per_chip: int
    chip_config: str
    hbm_bytes: int


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", 3, 2, "megacore", 32 * GiB),
        Generation("v5p", 3, 2, "megacore", int(95.74 * GiB)),
        Generation("v5e", 2, 1, "default", int(15.75 * GiB)),
        Generation("v6e", 2, 1, "default", int(31.25 * GiB)),
    )
}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v5lite": "v5e"}
# jax's device_kind for each generation.
_KINDS = {
    "TPU v4": "v4",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}
_NAMES_HELP = (
    "expected a Cloud TPU name (v4-32, v5p-64: TensorCores; v5e-16, v6e-64: chips) or "
    "a topology (v5p:2x4x4, v6e:8x8)"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """The chips a step is compiled for: `devices` over `num_slices` slices of
    `topology` ("v5p:2x4x4"; "local" for this host's devices)."""

    name: str
    topology: str
    num_slices: int
    devices: Sequence[Any]
    device_kind: str
    hbm_bytes: int

    def describe(self) -> str:
        slices = f"{self.num_slices} slices of " if self.num_slices > 1 else ""
        shape = "" if self.topology in (self.name, "local") else f" ({self.topology})"
        return (
            f"{slices}{self.name}{shape}: {len(self.devices)} chip"
            f"{'s' if len(self.devices) > 1 else ''} ({self.device_kind}), "
            f"{self.hbm_bytes / GiB:.2f} GiB HBM each"
        )


def _grid(chips: int, dims: int) -> list[int] | None:
    """The Cloud TPU slice shape of `chips` (a power of two): from 1x1 (2-D) or 2x2x1
    (3-D), double the last of the smallest dimensions until the count is reached."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(shape) or chips & (chips - 1):
        return None
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return shape


def topology_name(name: str) -> tuple[Generation, str]:
    """("v5p-64" or "v5p:2x4x4") -> (generation, libtpu topology "v5p:2x4x4")."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    gen = m and GENERATIONS.get(_ALIASES.get(m.group(1), m.group(1)))
    if gen is None:
        raise ConfigError(f"topology {name!r} is unknown; {_NAMES_HELP}")
    if m.group(3):
        dims = [int(d) for d in m.group(3).split("x")]
        if len(dims) == gen.dims and min(dims) < 1:
            bad = dims.index(min(dims))
            raise ConfigError(
                f"topology {name!r}: dimension {bad + 1} is {dims[bad]}; every dimension "
                f"counts chips, at least 1, e.g. {gen.name}:"
                f"{'x'.join(map(str, _grid(16, gen.dims)))}"
            )
        if len(dims) != gen.dims:
            raise ConfigError(
                f"topology {name!r}: a {gen.name} topology has {gen.dims} dimensions, "
                f"e.g. {gen.name}:{'x'.join(map(str, _grid(16, gen.dims)))}"
            )
    else:
        count = int(m.group(2))
        chips, rest = divmod(count, gen.cores_per_chip)
        dims = None if rest else _grid(chips, gen.dims)
        if dims is None:
            unit = "TensorCores, 2 per chip" if gen.cores_per_chip == 2 else "chips"
            smallest = (4 if gen.dims == 3 else 1) * gen.cores_per_chip
            raise ConfigError(
                f"topology {name!r}: {gen.name}-N counts {unit}; N is a power of two "
                f"from {smallest}. For other slices give the shape, e.g. "
                f"{gen.name}:{'x'.join(map(str, _grid(16, gen.dims)))}"
            )
    return gen, f"{gen.name}:{'x'.join(map(str, dims))}"


def tpu_target(name: str, num_slices: int = 1) -> Target:
    """The abstract chips of `num_slices` TPU slices named `name` (see `topology_name`),
    from libtpu: nothing needs to be attached to this host."""
    gen, topo_name = topology_name(name)
    if num_slices < 1:
        raise ConfigError(f"num_slices={num_slices} must be >= 1")
    try:
        from jax.experimental import topologies

        dims = [int(d) for d in topo_name.split(":")[1].split("x")]
        per_host = tuple(min(b, d) for b, d in zip((2, 2, 1), [*dims, 1, 1], strict=False))
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo_name,
            chip_config_name=gen.chip_config,
            chips_per_host_bounds=per_host,
            num_slices=num_slices,
        )
    except (ImportError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"topology {name!r} ({topo_name}): libtpu cannot describe it ({first_line(e)}); "
            "is libtpu installed (pip install 'jax[tpu]')?"
        ) from e
    devices = list(topo.devices)
    return Target(
        name=name,
        topology=topo_name,
        num_slices=num_slices,
        devices=devices,
        device_kind=devices[0].device_kind,
        hbm_bytes=_hbm_bytes(devices[0], gen),
    )


def local_target() -> Target:
    """This host's TPUs (all processes' devices of a multi-host slice)."""
    devices = jax.devices()
    if devices[0].platform != "tpu":
        raise ConfigError(
            f"this host has no TPU (its devices are {devices[0].platform}); name a TPU "
            "topology to compile for, e.g. v5p-64"
        )
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    kind = devices[0].device_kind
    return Target(
        name="local",
        topology="local",
        num_slices=slices,
        devices=devices,
        device_kind=kind,
        hbm_bytes=_hbm_bytes(jax.local_devices()[0], GENERATIONS.get(_KINDS.get(kind, ""))),
    )


def _hbm_bytes(device, gen: Generation | None) -> int:
    """The device's own figure where it gives one (attached chips), else the table's."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except (RuntimeError, ValueError):  # abstract chips of a topology have no stats
        limit = None
    if limit:
        return int(limit)
    gen = gen or GENERATIONS.get(_KINDS.get(device.device_kind, ""))
    if gen is None:
        raise ConfigError(f"HBM capacity of {device.device_kind!r} is unknown")
    return gen.hbm_bytes


def first_line(e: BaseException) -> str:
    """An exception's first line (libtpu's messages run on for pages)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def uncached_compiles():
    """Keeps compilations out of JAX's persistent cache while inside: executables built
    for chips this host lacks cannot be read back from it. (A minimum compile time no
    compile reaches; switching the cache off would last for the whole process.)"""
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
