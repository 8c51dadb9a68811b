"""Runs: one loop, driven by a recipe.

Every run (plain training, LoRA, distillation) does the same things: check the config,
the mesh and the data; build its step from shapes; load what it needs; start or resume
its state; then step, log, check the loss is finite, and save (also on a preemption
notice). `run` does them; a `Recipe` says what differs between kinds of run: the model
and how its parameters start, the step, the frozen parameters the step reads (a LoRA
base, a teacher), what checkpoints also record, the FLOPs of a token, and extra
metrics. `FullTraining` and `Lora` are here; `distill.Distillation` is the third.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath
from flax import nnx

from llama_jax import compress, data, formats, nn, paths, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import Tokenizer
from llama_jax.errors import ConfigError, NonFiniteLossError
from llama_jax.nn import Llama
from llama_jax.train import checkpointer, metrics, optim
from llama_jax.train.run_config import DISTILL_SECTIONS, ModelSpec, RunConfig
from llama_jax.train.step import (
    Plan,
    Step,
    TrainState,
    abstract_model,
    init_state,
    jit_step,
    make_lora_train_step,
    make_train_step,
    matmul_flops_per_token,
    plan,
)


class Setup(Plan):
    """A Plan, the tokenizer and the data iterator: all of it checked."""

    def __init__(self, p: Plan, tokenizer, iterator):
        super().__init__(**vars(p))
        self.tokenizer = tokenizer
        self.iterator = iterator


def setup(cfg, model_config: LlamaConfig) -> Setup:
    """`train_step.plan`, then checks the tokenizer and data and builds the data iterator.
    cfg: a RunConfig, or a config `RunConfig.of` takes."""
    cfg = RunConfig.of(cfg)
    if not cfg.data.path and not cfg.data.sources:
        raise ConfigError(
            "data.path is empty; give the training data (a file or a token store from "
            "launch.prepare_data), or data.sources to mix stores"
        )
    p = plan(cfg, model_config)
    if cfg.data.path and not epath.Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path} does not exist")
    if cfg.data.path:
        data.check_not_unfinished(cfg.data.path)
    tokenized = cfg.data.sources or cfg.data.format in ("tokens", "store")
    tokenized = tokenized or data.is_store(cfg.data.path)
    tokenizer = None
    if cfg.tokenizer:
        is_dir = epath.Path(cfg.tokenizer).is_dir()
        tokenizer = (Tokenizer.from_dir if is_dir else Tokenizer.from_file)(cfg.tokenizer)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's "
                f"{model_config.vocab_size}"
            )
    elif not tokenized:
        raise ConfigError(f"data.format={cfg.data.format!r} needs data.tokenizer")
    vocab = model_config.vocab_size
    iterator = data.DataIterator(cfg.data, tokenizer, p.batch_sh, vocab_size=vocab)
    return Setup(p, tokenizer, iterator)


def open_model_dir(spec: ModelSpec) -> formats.ModelDir | None:
    """The handle of `model.model_dir`, or None when the model starts from its preset."""
    return formats.ModelDir.open(spec.model_dir) if spec.model_dir else None


def initial_params(model_dir, spec: ModelSpec, make_model, mesh, rules):
    """Parameters in their shardings: read from `model_dir` (a ModelDir of any kind)
    straight into their shards, or random (from `make_model`) when it is None."""
    if model_dir is not None:
        _, abstract = model_dir.abstract(mesh, rules, **spec.kwargs())
        return model_dir.load_params(abstract)
    model = sharding.create_sharded(make_model, mesh, rules)
    return nnx.to_pure_dict(nnx.split(model)[1])


class Recipe:
    """What one kind of run does differently; `run` calls these in this order.

    __init__(cfg)      checks what the config and model directories alone can show, and
                       sets `model_config` (the trained model's architecture); the
                       model directories it reads are opened once, here
    build(plan)        the jitted step, from shapes alone (also compiled ahead of time)
    check(setup)       checks what needs the tokenizer or data files, before the workdir
                       is touched
    load(setup, saved) the frozen parameters the step reads after the state and batch
                       (None: it reads none); `saved` is the checkpoint metadata being
                       resumed, or None on a fresh start
    check_resumable(saved) raises unless a checkpoint written with config `saved` can
                       resume under this one
    inputs()           the directories the run reads (the workdir must stay apart)
    initial_params()   the trained parameters of a fresh start
    prepare(step, state, batch) the batch step `step` (0-based) trains on (default: as read)
    meta()             what checkpoints record besides data, config and model
    flops_per_token()  matmul FLOPs of one trained token (for MFU)
    on_log(step, state) metrics added at each logged step
    """

    model_config: LlamaConfig

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def build(self, p: Plan) -> Step:
        raise NotImplementedError

    def check(self, setup: Setup) -> None:
        return None

    def load(self, setup: Setup, saved: Mapping[str, Any] | None):
        return None

    def initial_params(self, setup: Setup):
        raise NotImplementedError

    def prepare(self, step: int, state: TrainState, batch):
        return batch

    def meta(self) -> dict[str, Any]:
        return {}

    def check_resumable(self, saved: Mapping[str, Any]) -> None:
        sections = [name for name in DISTILL_SECTIONS if name in saved]
        if sections:
            raise ConfigError(
                f"the workdir holds a distillation run (its config has {sections}); resume it "
                "with its distillation config, or use a new workdir"
            )
        check_resumable(saved, self.cfg)

    def inputs(self) -> list[str]:
        """The model directories the run reads, which its workdir must stay apart from."""
        return [self.cfg.model.model_dir]

    def flops_per_token(self) -> float:
        return matmul_flops_per_token(self.model_config, self.cfg.data.seq_len)

    def on_log(self, step: int, state: TrainState) -> dict[str, float]:
        return optim.prune_metrics(state.opt_state)


class FullTraining(Recipe):
    """Every parameter trains, from random or from `model.model_dir`; optionally under
    magnitude pruning (`prune`). model_dir: that directory's handle when the caller has
    opened it (by default opened here)."""

    def __init__(self, cfg: RunConfig, model_dir: formats.ModelDir | None = None):
        super().__init__(cfg)
        self.model_dir = model_dir or open_model_dir(cfg.model)
        md = self.model_dir
        self.model_config = md.config if md is not None else cfg.model.preset_config()

    def build(self, p: Plan) -> Step:
        cfg = self.cfg
        self.make_model, graphdef, abstract = abstract_model(
            p.model_config, cfg.model, p.mesh, p.rules, cfg.train.seed
        )
        tx = optim.build_optimizer(p.opt_cfg, cfg.prune, abstract)
        step_fn = make_train_step(
            graphdef,
            tx,
            optim.learning_rate_schedule(p.opt_cfg),
            grad_accum=cfg.train.grad_accum,
            loss_chunk=cfg.train.loss_chunk,
        )
        return jit_step(step_fn, tx, p, abstract)

    def initial_params(self, setup: Setup):
        return initial_params(
            self.model_dir, self.cfg.model, self.make_model, setup.mesh, setup.rules
        )


class Lora(Recipe):
    """LoRA adapters train over the frozen base in `model.model_dir` (any model
    directory, float or int8), which is loaded as stored and passed to the step as a
    non-donated argument; the state and checkpoints hold only the adapters. The
    checkpoints' `lora` entry records the settings and the base's path and fingerprint:
    a resume with other settings or another base is refused, and the model directory
    readers merge the adapters onto that base."""

    def __init__(
        self,
        cfg: RunConfig,
        base: formats.ModelDir | None = None,
        base_config: LlamaConfig | None = None,
    ):
        """base: the handle of model.model_dir when the caller has opened it (by default
        opened here); base_config: the base's architecture when only shapes are needed
        (ahead-of-time compilation)."""
        super().__init__(cfg)
        self.base = base or (None if base_config is not None else open_model_dir(cfg.model))
        if self.base is None and base_config is None:
            raise ConfigError(
                f"lora.rank={cfg.lora.rank} needs model.model_dir: the frozen base model "
                "the adapters are trained on (Hugging Face, converted, or a run)"
            )
        self.model_config = base_config or self.base.config
        self.lora_meta = compress.to_meta(cfg.lora)

    def build(self, p: Plan) -> Step:
        cfg = self.cfg
        self.make_model, graphdef, adapters, base = abstract_lora(cfg, p, self.base)
        self.abstract_adapters, self.abstract_base = adapters, base
        tx = optim.make_optimizer(p.opt_cfg)
        step_fn = make_lora_train_step(
            graphdef,
            tx,
            optim.learning_rate_schedule(p.opt_cfg),
            grad_accum=cfg.train.grad_accum,
            loss_chunk=cfg.train.loss_chunk,
            dropout_seed=cfg.train.seed if cfg.lora.dropout > 0 else None,
        )
        return jit_step(step_fn, tx, p, adapters, base, "frozen base")

    def load(self, setup: Setup, saved: Mapping[str, Any] | None):
        return load_lora_base(self.base, self.abstract_base, self.lora_meta, saved)

    def initial_params(self, setup: Setup):
        return compress.init_adapters(self.make_model, self.abstract_adapters)

    def meta(self) -> dict[str, Any]:
        return {"lora": self.lora_meta}

    def flops_per_token(self) -> float:
        return matmul_flops_per_token(self.model_config, self.cfg.data.seq_len, frozen=True)

    def on_log(self, step: int, state: TrainState) -> dict[str, float]:
        return {}


def abstract_lora(cfg: RunConfig, p: Plan, base: formats.ModelDir | None):
    """(make_model, graphdef, abstract adapters, abstract frozen base) of a LoRA run,
    the abstract parameters ShapeDtypeStructs with shardings. The base is as stored in
    `base` (a ModelDir: dtype and quantization); without one, float in model.dtype."""
    base_quant = base.quant_kwargs() if base is not None else {"quantization": None}
    dtype = base.stored_float_dtype if base is not None else jnp.dtype(cfg.model.dtype)

    def make_model():
        return Llama(
            p.model_config,
            lora=cfg.lora,
            rngs=nnx.Rngs(cfg.train.seed),
            **cfg.model.kwargs(),
            **compress.model_kwargs(**base_quant),
        )

    graphdef, abstract_adapters = compress.abstract_model(make_model, p.mesh, p.rules)
    _, abstract_base = nn.abstract_params(
        p.model_config, p.mesh, p.rules, dtype=dtype, **compress.model_kwargs(**base_quant)
    )
    return make_model, graphdef, abstract_adapters, abstract_base


def load_lora_base(base: formats.ModelDir, abstract_base, lora_meta: dict, saved):
    """The frozen base of a LoRA run (a ModelDir), read into the shardings of
    `abstract_base`. A
    resume (`saved`: the checkpoint's metadata) must train the adapters it restores
    (checked before reading) on the same base (checked after). lora_meta (`lora.to_meta`)
    gains the base's path and fingerprint."""
    if saved is not None:
        _check_same_lora(saved.get("lora"), lora_meta)
    log_info("loading the frozen base from %s", base)
    params = base.load_params(abstract_base)
    lora_meta["base"] = {
        "path": str(base.path.resolve()),
        "fingerprint": base.fingerprint(params),
    }
    if saved is not None:
        formats.check_lora_base(saved["lora"], lora_meta["base"]["fingerprint"], base.path)
    return params


def _check_same_lora(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """A resume must train the adapters it restores: same rank, alpha, dropout, targets."""
    if saved is None:
        raise ConfigError("the workdir holds a full training run, not LoRA adapters; use a new one")
    changed = [k for k in now if k != "base" and saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"lora.{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"the checkpoint's adapters were trained with other LoRA settings ({diffs}); "
            "resume with those or use a new workdir"
        )


def recipe_for(cfg: RunConfig) -> Recipe:
    """The recipe of a training config: LoRA when `lora.rank` > 0, else full training."""
    return Lora(cfg) if cfg.lora is not None else FullTraining(cfg)


def run(cfg, workdir, recipe: Recipe | None = None) -> dict[str, float]:
    """Runs `recipe` (default `recipe_for(cfg)`) per `cfg` (configs/base.py layout: a
    ConfigDict or a RunConfig) in `workdir`, resuming from its latest complete
    checkpoint. Returns the last logged metrics.

    Everything that can be checked (config, mesh, batch split, model config, tokenizer,
    data, a resumed checkpoint's settings) is checked before anything is compiled or
    initialised.
    """
    account = metrics.TimeAccount()
    cfg = RunConfig.of(cfg)
    recipe = recipe or recipe_for(cfg)
    prepared = setup(cfg, recipe.model_config)
    step = recipe.build(prepared)
    recipe.check(prepared)

    # The workdir is neither the data nor inside it (it may hold a data file of its own).
    data_paths = [cfg.data.path, *(path for path, _ in cfg.data.sources)]
    paths.check_apart(workdir, data_paths, flag="--workdir", may_contain=True)
    workdir, ckpt = open_run(cfg, workdir, inputs=recipe.inputs())
    prepared.workdir = workdir
    saved = None
    if ckpt.latest_step() is not None:
        saved = formats.latest_meta(workdir)
        recipe.check_resumable(saved.get("config", {}))
        check_same_stores(saved.get("data_stores"), prepared.iterator.store_digests())
    frozen = recipe.load(prepared, saved)
    if saved is not None:
        state = resume(ckpt, prepared.iterator, step)
    else:
        state, _ = init_state(recipe.initial_params(prepared), step.tx, prepared.mesh)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", cfg.raw)

    next_step = [int(state.step)]

    def step_fn(state, batch):
        batch = account.timed("generation", recipe.prepare, next_step[0], state, batch)
        next_step[0] += 1
        return step.fn(state, batch) if frozen is None else step.fn(state, batch, frozen)

    def meta() -> dict[str, Any]:
        return {
            "data": prepared.iterator.state(),
            "data_stores": prepared.iterator.store_digests(),
            "config": cfg.raw,
            "model": recipe.model_config.to_dict(),
            **recipe.meta(),
        }

    account.add("startup", time.perf_counter() - account.started)
    with sharding.activation_sharding(prepared.mesh, prepared.rules):
        return loop(
            cfg,
            workdir,
            state,
            step_fn,
            prepared.iterator,
            ckpt,
            meta,
            flops_per_token=recipe.flops_per_token(),
            on_log=recipe.on_log,
            account=account,
        )


def loop(
    cfg: RunConfig,
    workdir,
    state,
    step_fn,
    iterator,
    ckpt,
    meta,
    *,
    flops_per_token: float,
    on_log=None,
    account: metrics.TimeAccount | None = None,
) -> dict[str, float]:
    """Runs `state, metrics = step_fn(state, batch)` from state.step to cfg.train.steps:
    logs, checks finiteness, saves (and on SIGTERM saves and stops). on_log(step,
    state) may add entries to a logged step's metrics (e.g. an evaluation).

    Time is accounted (`account`, one is made if not given): waiting for batches, the
    first step (compiling), evaluation in on_log, blocking on checkpoint saves; each
    logged step records its interval's share, and the run ends with a summary line and
    a record of `run/` entries (goodput: the share of wall time that was training
    steps). `train.profile_steps` traces those steps into <workdir>/profile.
    Returns the last logged metrics and the run summary."""
    start = int(state.step)
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    total = cfg.train.steps
    last: dict[str, float] = {}
    account = account or metrics.TimeAccount()
    profile = Profile(workdir, cfg.train.profile_range(), start)
    # Leaving the block (also by an error) waits for an asynchronous save in flight, so
    # the last good checkpoint is complete on disk.
    with (
        ckpt,
        metrics.MetricsWriter(workdir) as writer,
        checkpointer.PreemptionWatch(check_every=cfg.train.log_every) as preemption,
    ):
        throughput = None
        pending: list[tuple[int, dict]] = []
        step = logged = start
        try:
            while step < total:
                batch = account.timed("data_wait", next, iterator)
                profile.before(step + 1)
                if throughput is None:
                    # The first step compiles; time the rest from its end.
                    started, generation = time.perf_counter(), account.total["generation"]
                    state, m = step_fn(state, batch)
                    jax.block_until_ready(m)
                    generated = account.total["generation"] - generation
                    account.add("compile", time.perf_counter() - started - generated)
                    throughput = metrics.Throughput(
                        flops_per_token, total_steps=total, start_step=step + 1
                    )
                    logged = step + 1
                else:
                    state, m = step_fn(state, batch)
                step += 1
                profile.after(step, m)
                pending.append((step, m))
                stop = preemption.should_stop(step)
                boundary = step % cfg.train.log_every == 0 or step == total or stop
                saving = step % cfg.checkpoint.save_every == 0 or step == total or stop
                if boundary or saving:
                    # Every step's finiteness is checked before anything is saved or logged.
                    fetched = jax.device_get([pm for _, pm in pending])
                    for (s, _), pm in zip(pending, fetched, strict=True):
                        check_finite(s, pm)
                    last = {k: float(v) for k, v in fetched[-1].items() if k != "finite"}
                    pending.clear()
                if boundary:
                    if step > logged:
                        rates = throughput.update(step, tokens_per_step * (step - logged))
                        logged = step
                        last |= {k: v for k, v in rates.items() if v is not None}
                    if on_log is not None:
                        last |= account.timed("eval", on_log, step, state)
                    last |= account.interval()
                    last |= {f"tokens/{name}": n for name, n in source_tokens(iterator).items()}
                    writer.write(step, last)
                    log_info("%s", metrics.progress_line(step, total, last))
                if saving:
                    account.timed(
                        "checkpoint", ckpt.save, step, state, meta(), force=step == total or stop
                    )
                if stop:
                    log_info("preemption notice: saved step %d, stopping", step)
                    break
        finally:
            profile.close()
        summary = account.summary()
        writer.write(step, {f"run/{k}": v for k, v in summary.items()})
        log_info("%s", metrics.summary_line(summary))
    return last | {f"run/{k}": v for k, v in summary.items()}


def source_tokens(iterator) -> dict[str, int]:
    """Tokens each source of a data mixture has given so far ({} for one source)."""
    tokens = getattr(iterator, "source_tokens", None)
    if tokens is None:  # a wrapper such as the logit cache's
        tokens = getattr(getattr(iterator, "iterator", None), "source_tokens", None)
    return tokens() if tokens is not None else {}


class Profile:
    """A jax.profiler trace of steps [first, last] (1-based) into <workdir>/profile, for
    TensorBoard's profile plugin or XProf; nothing when `steps` is None. A run resumed
    inside the range traces from its first step; one resumed past it says so and traces
    nothing."""

    def __init__(self, workdir, steps: tuple[int, int] | None, start: int = 0):
        self.directory = epath.Path(workdir) / "profile"
        self.steps, self.active = steps, False
        if steps is not None and start >= steps[1]:
            log_info(
                "train.profile_steps=%d:%d lies before the resumed step %d: no trace is written",
                *steps,
                start + 1,
            )
            self.steps = None

    def before(self, step: int) -> None:
        if self.steps is not None and self.steps[0] <= step <= self.steps[1] and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log_info("profile of steps %d-%d written to %s", *self.steps, self.directory)
            self.steps = None


def open_run(cfg: RunConfig, workdir, inputs=()) -> tuple[epath.Path, Any]:
    """The run's workdir (created if missing) and its checkpoint manager. The workdir
    must be a directory apart from `inputs` (not one of them, inside one, or holding
    one): a run never writes into the models it reads."""
    paths.check_apart(workdir, inputs, flag="--workdir")
    workdir = epath.Path(paths.check_output_dir(workdir, flag="--workdir"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpointer.Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.checkpoint.save_every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    return workdir, ckpt


def resume(ckpt, iterator, step: Step) -> TrainState:
    """Restores the latest checkpoint onto the step's state shardings and moves the data
    iterator to where it stopped."""
    restored_step, state, meta = ckpt.restore(step.state)
    iterator.restore(meta["data"])
    log_info("resumed from step %d", restored_step)
    return state


def check_same_stores(saved: Mapping[str, str] | None, now: Mapping[str, str]) -> None:
    """Raises when a token store the checkpoint read was rebuilt since (same path, other
    rows): its batches would not be the ones the run would have seen. Checkpoints written
    before stores were recorded (`saved` None) are not checked."""
    for path in sorted(set(saved or {}) & set(now)):
        if saved[path] != now[path]:
            raise ConfigError(
                f"the token store {path} holds other rows than when the checkpoint was written "
                f"(digest {saved[path][:12]}... -> {now[path][:12]}...): it was rebuilt, so "
                "resuming would not see the batches the run would have. Use a new workdir or "
                "the store the run started with."
            )


def check_resumable(saved: Mapping[str, Any], cfg: RunConfig) -> None:
    """Raises unless a checkpoint written with config `saved` (as written) can resume
    under `cfg`: the data position only means the same batches with the same data
    settings, and the pruning masks and schedule live in the optimizer state. A
    recipe's `check_resumable` adds what its own sections need."""
    keys = ("path", "format", "field", "seq_len", "global_batch", "seed", "add_bos", "add_eos")
    # Compared as written: the typed config fills in what the files imply (a store's
    # format), which the config as saved does not spell.
    before = saved.get("data", {})
    written = cfg.raw.get("data", {})
    now = {k: written.get(k, getattr(cfg.data, k)) for k in keys}
    changed = [k for k in keys if k in before and before[k] != now[k]]
    if changed:
        diffs = ", ".join(f"data.{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"the checkpoint was written with other data settings ({diffs}); resuming would "
            "not see the batches the run would have. Use a new workdir or the old settings."
        )
    prune_before = saved.get("prune")
    if compress.parse_prune(prune_before) != cfg.prune:
        raise ConfigError(
            f"the checkpoint was written with prune settings {prune_before}, not "
            f"{cfg.raw.get('prune')}; resume with the same prune block or use a new workdir"
        )


def write_json(path, obj: Mapping[str, Any]) -> None:
    """Writes JSON to a temporary name and renames it, so readers never see half a file."""
    path = epath.Path(path)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
    if not metrics["finite"]:
        raise NonFiniteLossError(
            f"step {step}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not "
            "finite; stopping without saving (the last checkpoint is intact). Lower the "
            "learning rate, check the data, or use float32 compute to find the cause."
        )


def log_info(msg: str, *args) -> None:
    """Progress for people: stdout on process 0 (and the absl log)."""
    if jax.process_index() == 0:
        logging.info(msg, *args)
        print(msg % args, flush=True)
