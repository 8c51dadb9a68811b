"""Ahead-of-time compilation of a run's step, and what it needs on each chip.

A target (`topology.tpu_target("v5p-64")`, a slice this host need not have, or
`topology.local_target()`, this host's TPUs) gives the chips to compile for.
`build(cfg, target)` makes the step that `train.run` would jit for `cfg`, whatever
its recipe (same step function, shardings, donation and gradient accumulation),
from shapes alone: no data, no checkpoint. `compile_step` compiles it for the target
and reports, per chip, the HBM taken by each kind of argument (from the arguments'
shard shapes, padded to the compiled layouts' tiles), XLA's temporaries and generated
code, against the chip's capacity; the compile time; and the collectives in the
compiled HLO.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from typing import Any

import jax

from llama_jax import distill, formats, nn, sharding, train
from llama_jax.config import get_preset
from llama_jax.errors import ConfigError, DoesNotFitError
from llama_jax.tpu import topology
from llama_jax.tpu.topology import Target

GiB = 1 << 30


# --- the step ----------------------------------------------------------------


@dataclasses.dataclass
class Build:
    """A run's step built for a target: kind is "train", "lora" or "distill"; notes
    say where the shapes came from."""

    kind: str
    cfg: Any
    plan: train.Plan
    step: train.Step
    models: dict[str, Any]
    notes: list[str]


def _model_source(spec, section: str, notes: list[str]):
    """(`spec` (a ModelSpec or TeacherSpec), the handle of its model_dir). When the
    directory cannot be read here, the handle is None and model_dir is cleared, noting
    it: the shapes then come from the section's preset."""
    if not spec.model_dir:
        return spec, None
    try:
        return spec, formats.ModelDir.open(spec.model_dir)
    except Exception as e:  # noqa: BLE001 - any reason (missing, remote, unreadable) counts
        notes.append(
            f"{section}.model_dir={spec.model_dir} cannot be read here "
            f"({topology.first_line(e)}); shapes from {section}.preset={spec.preset!r}"
        )
        return dataclasses.replace(spec, model_dir=""), None


def build(cfg, target: Target) -> Build:
    """The step of `cfg` (a train, LoRA or distillation config: a ConfigDict or a
    RunConfig) jitted for the target's devices, with its abstract arguments. Model
    shapes come from model directories that can be read here, else from presets
    (`model.preset` with `model.overrides`, `teacher.preset`); a LoRA base that cannot
    be read is taken as float in model.dtype. Config, mesh and batch problems raise
    ConfigErrors, as a run would."""
    cfg = distill.typed_config(cfg)
    notes: list[str] = []
    if cfg.mesh.dcn not in (1, target.num_slices):
        raise ConfigError(
            f"mesh.dcn={cfg.mesh.dcn} but the target has {target.num_slices} slice(s); the "
            "dcn axis is the number of slices"
        )
    mesh = dataclasses.replace(cfg.mesh, dcn=target.num_slices)
    model, model_dir = _model_source(cfg.model, "model", notes)
    cfg = cfg.replace(mesh=mesh, model=model)

    recipe: train.Recipe
    if isinstance(cfg, distill.DistillConfig):
        teacher, teacher_dir = _model_source(cfg.teacher, "teacher", notes)
        cfg = cfg.replace(teacher=teacher)
        if teacher_dir is not None:
            teacher_config = teacher_dir.config
        elif teacher.preset:
            try:
                teacher_config = get_preset(teacher.preset)
            except ConfigError as e:
                raise ConfigError(f"teacher.preset: {e}") from e
        else:
            raise ConfigError(
                "the teacher's shapes are unknown: give teacher.model_dir (a readable model "
                "directory) or teacher.preset (e.g. --config.teacher.preset=llama3-8b)"
            )
        recipe = distill.Distillation(
            cfg, teacher=teacher_dir, teacher_config=teacher_config, model_dir=model_dir
        )
        kind, models = "distill", {"student": recipe.model_config, "teacher": teacher_config}
    elif cfg.lora is not None:
        base_config = None if model_dir is not None else cfg.model.preset_config()
        recipe = train.Lora(cfg, base=model_dir, base_config=base_config)
        kind, models = "lora", {"base": recipe.model_config}
    else:
        recipe = train.FullTraining(cfg, model_dir=model_dir)
        kind, models = "train", {"model": recipe.model_config}
    try:
        p = train.plan(cfg, recipe.model_config, devices=target.devices)
    except ConfigError as e:
        raise ConfigError(f"{target.describe()}: {e}") from e
    return Build(kind, cfg, p, recipe.build(p), models, notes)


# --- compiling and measuring ---------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.-]+)\s")
_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+\s*=.*?\s([a-z][a-z0-9-]*)\(")
# XLA:TPU emits a reduce-scatter as a fusion calling an "all-reduce-scatter"
# computation (an all-reduce and a slice inside).
_RS_FUSION = "all-reduce-scatter"
# Mosaic (Pallas TPU) kernels are custom calls with this target.
KERNEL_CALL = 'custom_call_target="tpu_custom_call"'


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text, by kind; an asynchronous pair (-start,
    -done) counts once, and a reduce-scatter fused as all-reduce + slice counts as a
    reduce-scatter. Ops in a loop body (the scanned layers) count once."""
    counts = collections.Counter({k: 0 for k in COLLECTIVES})
    computation = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            computation = head.group(1)
            continue
        m = _OPCODE.match(line)
        if m is None:
            continue
        op = m.group(1).removesuffix("-start")
        if op == "fusion" and f"calls=%{_RS_FUSION}" in line:
            counts["reduce-scatter"] += 1
        elif op in COLLECTIVES and not computation.startswith(_RS_FUSION):
            counts[op] += 1
    return dict(counts)


def _padded_bytes(x: jax.ShapeDtypeStruct, fmt) -> tuple[int, int]:
    """(bytes of x's shard, the same padded to its compiled layout's tile)."""
    shape = list(x.sharding.shard_shape(x.shape))
    itemsize = x.dtype.itemsize
    raw = math.prod(shape) * itemsize
    layout = getattr(fmt, "layout", None)
    tiling = getattr(layout, "tiling", None)
    if not tiling:
        return raw, raw
    phys = [shape[d] for d in layout.major_to_minor]
    tile = tiling[0]
    phys = [1] * max(0, len(tile) - len(phys)) + phys
    for i, t in enumerate(tile):
        j = len(phys) - len(tile) + i
        phys[j] = -(-phys[j] // t) * t
    return raw, math.prod(phys) * itemsize


@dataclasses.dataclass
class Report:
    """What a compiled step needs per chip. Byte counts are per chip; `parts` splits
    the arguments (padded to the compiled layouts' tiles) by what they are."""

    kind: str
    target: str
    mesh: dict[str, int]
    parts: dict[str, int]
    unpadded_arguments: int
    xla_arguments: int
    outputs: int  # outputs not aliased to a donated argument
    temporaries: int
    code: int
    capacity: int
    compile_seconds: float
    collectives: dict[str, int]
    kernel_calls: int
    settings: dict[str, Any]
    notes: list[str]
    hlo_text: str = dataclasses.field(default="", repr=False)

    @property
    def total(self) -> int:
        return self.xla_arguments + self.outputs + self.temporaries + self.code

    @property
    def headroom(self) -> float:
        """Fraction of HBM left; negative when the step does not fit."""
        return 1.0 - self.total / self.capacity

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        """The figures (not the HLO text), with the derived total and headroom."""
        out = dataclasses.asdict(self)
        del out["hlo_text"]
        return out | {
            "total": self.total,
            "headroom": self.headroom,
            "fits": self.fits,
        }

    def table(self) -> str:
        """The report as aligned text lines (GiB, or MiB for a step under 1 GiB)."""
        s = self.settings
        unit, scale = ("GiB", GiB) if self.total >= GiB else ("MiB", 1 << 20)
        rows = [
            f"{self.kind} step compiled for {self.target}",
            f"  mesh {_axes(self.mesh)}; {s['batch']}",
            f"  {s['models']}",
            f"  remat {s['remat_policy']}, attention {s['attention']}, loss_chunk "
            f"{s['loss_chunk']}",
            *[f"  note: {n}" for n in self.notes],
            "",
            f"  {'HBM per chip':<30}{unit:>10}{'of HBM':>9}",
        ]

        def row(name, n):
            rows.append(f"  {name:<30}{n / scale:>10.3f}{n / self.capacity:>9.1%}")

        for name, n in self.parts.items():
            row(name, n)
        row("temporaries (XLA)", self.temporaries)
        row("outputs not donated (metrics)", self.outputs)
        row("generated code", self.code)
        rows.append(f"  {'-' * 49}")
        row("total", self.total)
        row("HBM capacity", self.capacity)
        row("headroom", self.capacity - self.total)
        rows += [
            "",
            f"  arguments: {self.xla_arguments / scale:.3f} {unit} as XLA counts them = the "
            "parts above, each shard padded to its layout's tiles "
            f"({self.unpadded_arguments / scale:.3f} {unit} unpadded)",
            f"  compile time {self.compile_seconds:.1f} s; Pallas kernel calls {self.kernel_calls}",
            "  collectives in the HLO: "
            + ", ".join(f"{k} {v}" for k, v in self.collectives.items()),
        ]
        return "\n".join(rows)

    def advice(self) -> str:
        """What to change so the step fits, with this config's numbers."""
        s = self.settings
        over = (self.total - self.capacity) / GiB
        lines = [
            f"the {self.kind} step needs {_gib(self.total)} per chip on {self.target}, "
            f"{over:.2f} GiB more than the {_gib(self.capacity)} HBM; change one of:"
        ]
        return "\n".join(lines + [f"  - {a}" for a in s["advice"]])

    def check_fits(self) -> None:
        """Raises DoesNotFitError (with `advice`) unless the step fits."""
        if not self.fits:
            raise DoesNotFitError(self.advice())


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _axes(mesh: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items())


_TRAINED = {"train": "parameters", "lora": "LoRA adapters", "distill": "student parameters"}
_REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


def _advice(b: Build, state_bytes: int, frozen_bytes: int) -> list[str]:
    """Changes that lower the step's memory, most effective first, with numbers."""
    cfg, p = b.cfg, b.plan
    gb, accum, seq = cfg.data.global_batch, cfg.train.grad_accum, cfg.data.seq_len
    shards = sharding.axis_size(p.mesh, p.rules, "batch")
    micro = gb // accum
    per_chip = micro // shards
    out = []
    bigger = [a for a in range(accum + 1, gb + 1) if gb % a == 0 and (gb // a) % shards == 0]
    if bigger:
        a = bigger[0]
        out.append(
            f"per-chip batch: {per_chip} rows of {seq} tokens (data.global_batch={gb} / "
            f"train.grad_accum={accum} over {shards} batch shards); "
            f"--config.train.grad_accum={a} makes it {gb // a // shards}"
        )
    else:
        out.append(
            f"per-chip batch: {per_chip} row(s) of {seq} tokens is the least this mesh "
            f"splits data.global_batch={gb} into; lower data.seq_len={seq}"
        )
    policy = cfg.model.remat_policy
    if policy != "full":
        lighter = _REMAT_ORDER[_REMAT_ORDER.index(policy) + 1 :]
        out.append(
            f"model.remat_policy={policy}: {' or '.join(lighter)} keeps fewer activations "
            "for the backward pass (recomputes more)"
        )
    sizes = {k: p.mesh.shape[k] for k in sharding.MESH_AXES}
    weights = _gib(state_bytes + frozen_bytes)
    held = "parameters and optimizer state"
    if b.step.frozen is not None:
        held = f"parameters, optimizer state and {b.step.frozen_name}"
    if sizes["data"] > 1:
        out.append(
            f"mesh.data={sizes['data']}: the {held} ({weights} per chip) are replicated over "
            f"it; --config.mesh.data=1 --config.mesh.fsdp=-1 shards them over all "
            f"{sizes['data'] * sizes['fsdp'] * sizes['tensor']} chips of a slice"
        )
    else:
        out.append(
            f"mesh: {_axes(sizes)}, the {held} take {weights} per chip; "
            f"--config.mesh.tensor={2 * sizes['tensor']} (with mesh.fsdp=-1) also splits "
            "heads, MLP and vocabulary activations; or use a larger slice"
        )
    out.append(
        f"train.loss_chunk={cfg.train.loss_chunk}: the float32 logits of one chunk are "
        f"{per_chip} x {cfg.train.loss_chunk} x {p.model_config.vocab_size}; a smaller "
        "chunk shrinks them"
    )
    return out


def compile_step(b: Build, target: Target) -> Report:
    """Compiles the built step for the target and measures it (see `Report`). A compile
    that runs out of HBM raises DoesNotFitError."""
    step = b.step
    args = step.args()
    t0 = time.perf_counter()
    try:
        with topology.uncached_compiles():
            with sharding.activation_sharding(b.plan.mesh, b.plan.rules):
                lowered = step.fn.lower(*args)
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFitError(
            f"the {b.kind} step does not fit {target.describe()}: {topology.first_line(e)}\n"
            + "change one of:\n"
            + "\n".join(f"  - {a}" for a in _advice(b, *_weights_estimate(step)))
        ) from e
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    formats = compiled.input_formats[0]

    def bytes_of(tree, fmts) -> tuple[int, int]:
        pairs = [
            _padded_bytes(x, f)
            for x, f in zip(jax.tree.leaves(tree), jax.tree.leaves(fmts), strict=True)
        ]
        return sum(r for r, _ in pairs), sum(q for _, q in pairs)

    f_state, f_batch = formats[0], formats[1]
    params = bytes_of(step.state.params, f_state.params)
    opt = bytes_of((step.state.step, step.state.opt_state), (f_state.step, f_state.opt_state))
    batch = bytes_of(step.batch, f_batch)
    frozen = bytes_of(step.frozen, formats[2]) if step.frozen is not None else (0, 0)
    parts = {
        _dtype_label(_TRAINED[b.kind], step.state.params): params[1],
        "optimizer state": opt[1],
    }
    if step.frozen is not None:
        parts[_dtype_label(step.frozen_name, step.frozen)] = frozen[1]
    parts["batch"] = batch[1]
    hlo = compiled.as_text()
    p, cfg = b.plan, b.cfg
    gb, accum = cfg.data.global_batch, cfg.train.grad_accum
    shards = sharding.axis_size(p.mesh, p.rules, "batch")
    return Report(
        kind=b.kind,
        target=target.describe(),
        mesh={k: int(v) for k, v in p.mesh.shape.items()},
        parts=parts,
        unpadded_arguments=params[0] + opt[0] + batch[0] + frozen[0],
        xla_arguments=int(mem.argument_size_in_bytes),
        outputs=int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes),
        code=int(mem.generated_code_size_in_bytes),
        capacity=target.hbm_bytes,
        compile_seconds=seconds,
        collectives=collective_counts(hlo),
        kernel_calls=hlo.count(KERNEL_CALL),
        settings={
            "batch": (
                f"batch {gb} x {cfg.data.seq_len} tokens, grad_accum {accum}: "
                f"{gb // accum // shards} row(s) per chip per microbatch"
            ),
            "models": ", ".join(f"{k} {_model_line(c)}" for k, c in b.models.items()),
            "remat_policy": cfg.model.remat_policy,
            "attention": _attention_line(cfg.model.attention_impl, target),
            "loss_chunk": cfg.train.loss_chunk,
            "advice": _advice(b, params[1] + opt[1], frozen[1]),
        },
        notes=b.notes,
        hlo_text=hlo,
    )


def _attention_line(impl: str, target: Target) -> str:
    platform = target.devices[0].platform
    resolved = nn.resolve_implementation(impl, platform)
    return impl if resolved == impl else f"{impl} ({resolved} on {platform})"


def _weights_estimate(step: train.Step) -> tuple[int, int]:
    """(state, frozen) bytes per chip from shard shapes alone (no compiled layouts)."""

    def n(tree):
        return sum(_padded_bytes(x, None)[0] for x in jax.tree.leaves(tree))

    return n(step.state), 0 if step.frozen is None else n(step.frozen)


def _dtype_label(name: str, tree) -> str:
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(tree)})
    return f"{name} ({'/'.join(dtypes)})"


def _model_line(config) -> str:
    n = config.num_params()
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return (
        f"L{config.num_layers} D{config.embed_dim} N{config.num_heads} K{config.num_kv_heads} "
        f"H{config.head_dim} F{config.mlp_dim} V{config.vocab_size} ({size} parameters)"
    )


def compile_config(cfg, target: Target) -> Report:
    """`build` then `compile_step`: the figures `launch.compile` prints."""
    return compile_step(build(cfg, target), target)
