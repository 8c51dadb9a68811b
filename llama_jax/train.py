"""Training: the optimizer, a jitted and sharded train step, and the loop.

State is plain pytrees: `params` (the model's parameters as a nested dict, float32
master weights), `opt_state` (optax) and `step`. The step runs under `jax.jit` with
explicit shardings and a donated state; its loss is the float32 chunked cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import checkpoint, data, lora, lora_dir, metrics, model_dir, prune, quant, sharding
from llama_jax.config import LlamaConfig, get_preset
from llama_jax.errors import ConfigError, NonFiniteLossError
from llama_jax.losses import token_loss_sum
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    params: Any  # nested dict of arrays, the model's parameters
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"  # "cosine", "linear" or "constant" after warmup
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


def build_optimizer(cfg, opt_cfg: OptimizerConfig, params) -> optax.GradientTransformation:
    """The run's optimizer: `make_optimizer`, wrapped in magnitude pruning when the
    config's `prune` block asks for it (params: arrays or shapes, for their paths)."""
    tx = make_optimizer(opt_cfg)
    prune_cfg = prune.from_config(cfg.get("prune"))
    return tx if prune_cfg is None else prune.masked(tx, prune_cfg, params)


def prune_metrics(opt_state) -> dict[str, float]:
    """Sparsity overall and per layer when the optimizer prunes, else nothing."""
    found = prune.find_state(opt_state)
    return {} if found is None else prune.sparsity_report(found.masks)


def batch_sharding(mesh, rules, shape: tuple[int, int]) -> NamedSharding:
    """Sharding of an int[B, T] batch from the logical names ("batch", "length")."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), shape, mesh, rules))


def check_batch(global_batch: int, grad_accum: int, mesh, rules):
    """Raises unless every microbatch splits evenly over the batch mesh axes (a batch
    the axes do not divide would silently be replicated)."""
    if grad_accum < 1 or global_batch % grad_accum:
        raise ConfigError(
            f"global_batch={global_batch} is not divisible by grad_accum={grad_accum}"
        )
    micro = global_batch // grad_accum
    shards = sharding.axis_size(mesh, rules, "batch")
    if micro % shards:
        raise ConfigError(
            f"microbatch of {micro} rows (global_batch={global_batch} / grad_accum="
            f"{grad_accum}) is not divisible by the {shards} batch shards of mesh "
            f"{dict(mesh.shape)}"
        )


def make_step(loss_fn, tx: optax.GradientTransformation, schedule: optax.Schedule, *, grad_accum=1):
    """Returns step(state, batch, *args) -> (state, metrics), not yet jitted.

    loss_fn(params, microbatch, step, *args) -> (float32[] loss sum, aux): aux is a dict
    of float32[] sums that includes "count", the number of counted tokens. The loss is
    the mean over the batch's counted tokens, also under accumulation (the
    microbatches' sums and counts are added before dividing); every other aux entry is
    reported as its mean too. `finite` reports whether the loss and gradient norm were
    finite; the loop stops on a False.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Mapping[str, jax.Array], *args):
        if grad_accum == 1:
            (total, aux), grads = grad_fn(state.params, batch, state.step, *args)
        else:
            # Microbatch a takes rows a, a + A, a + 2A, ...: each stays spread over all
            # batch shards instead of living on a slice of the devices.
            def split(x):
                b = x.shape[0]
                x = x.reshape(b // grad_accum, grad_accum, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro = jax.tree.map(split, dict(batch))

            def body(carry, mb):
                mb = {k: sharding.constrain(v, ("batch", "length")) for k, v in mb.items()}
                (t, a), g = grad_fn(state.params, mb, state.step, *args)
                acc_t, acc_a, acc_g = carry
                acc_g = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), acc_g, g)
                return (acc_t + t, jax.tree.map(jnp.add, acc_a, a), acc_g), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            abstract_aux = jax.eval_shape(
                lambda: grad_fn(
                    state.params, jax.tree.map(lambda x: x[0], micro), state.step, *args
                )
            )[0][1]
            zero_aux = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_aux)
            init = (jnp.zeros((), jnp.float32), zero_aux, zeros)
            (total, aux, grads), _ = jax.lax.scan(body, init, micro)
        count = aux["count"]
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            **{k: v / denom for k, v in aux.items() if k != "count"},
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": count,
            "finite": finite,
        }
        return new_state, metrics

    return step


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int = 1,
    loss_chunk: int = 512,
):
    """Returns step(state, batch) -> (state, metrics), not yet jitted.

    batch: dict of int32[B, T] `tokens`, `segment_ids`, `targets`, `loss_mask`. The
    loss is the float32 chunked cross-entropy (see `make_step`).
    """

    def loss_sum(params, micro, step):
        total, count = token_loss_sum(nnx.merge(graphdef, params), micro, loss_chunk)
        return total, {"count": count}

    return make_step(loss_sum, tx, schedule, grad_accum=grad_accum)


def make_lora_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int = 1,
    loss_chunk: int = 512,
    dropout_seed: int | None = None,
):
    """Returns step(state, batch, base_params) -> (state, metrics), not yet jitted.

    The state's params are LoRA adapters (`lora.abstract_model`; graphdef is the adapted
    model's); base_params are the frozen base's, a separate argument that takes no
    gradient. The loss is `make_train_step`'s. dropout_seed: the adapters' dropout
    masks come from (seed, step, global row); None applies no dropout.
    """

    def loss_sum(adapters, micro, step, base_params):
        keys = None
        if dropout_seed is not None:
            keys = lora.dropout_keys(dropout_seed, step, micro["rows"][:, 0])
        model = nnx.merge(graphdef, lora.combine(base_params, adapters))
        total, count = token_loss_sum(model, micro, loss_chunk, dropout_keys=keys)
        return total, {"count": count}

    step = make_step(loss_sum, tx, schedule, grad_accum=grad_accum)
    if dropout_seed is None:
        return step

    def step_with_rows(state, batch, base_params):
        # Each row's index in the global batch travels with it through the microbatch
        # split, so its dropout masks do not depend on grad_accum.
        rows = jnp.arange(batch["tokens"].shape[0], dtype=jnp.int32)[:, None]
        return step(state, {**batch, "rows": rows}, base_params)

    return step_with_rows


def state_shardings(params, tx, mesh) -> TrainState:
    """Shardings of a TrainState for params (arrays or ShapeDtypeStructs with shardings).

    An optimizer-state leaf whose path ends with a parameter's path and has its shape
    (Adam's moments, pruning masks) takes that parameter's sharding; every other leaf
    (counters, schedules) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    by_path = {
        _dict_keys(path): (x.shape, x.sharding)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def pick(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            shape, sh = by_path.get(keys[i:], (None, None))
            if shape == leaf.shape:
                return sh
        return replicated

    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = jax.tree_util.tree_map_with_path(pick, abstract_opt)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def _dict_keys(path) -> tuple[str, ...]:
    """The trailing run of dict keys of a pytree path (a parameter's own path)."""
    keys: list[str] = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return tuple(reversed(keys))


def init_state(params, tx, mesh) -> tuple[TrainState, TrainState]:
    """A TrainState at step 0 created in its shardings, and those shardings."""
    shardings = state_shardings(params, tx, mesh)

    def init(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings


def jit_train_step(step_fn, shardings: TrainState, batch_sh: NamedSharding, *extra_shardings):
    """Jits step(state, batch, *extra) with explicit shardings; the state is donated."""
    replicated = NamedSharding(batch_sh.mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sh, *extra_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def write_json(path: str, obj: Mapping[str, Any]) -> None:
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


def model_kwargs(model_cfg) -> dict[str, Any]:
    """The `Llama` keyword arguments (dtypes, layer scan, remat, attention) of a
    config's `model` section."""
    return dict(
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
        scan_layers=model_cfg.scan_layers,
        remat_policy=model_cfg.remat_policy,
        attention_impl=model_cfg.attention_impl,
    )


def initial_params(model_cfg, config, make_model, mesh, rules):
    """Parameters in their shardings: random (from `make_model`), or read from a model
    directory of any kind straight into their shards."""
    if model_cfg.model_dir:
        _, abstract = model_dir.abstract_params(config, mesh, rules, **model_kwargs(model_cfg))
        return model_dir.load_params(model_cfg.model_dir, config, abstract)
    model = sharding.create_sharded(make_model, mesh, rules)
    return nnx.to_pure_dict(nnx.split(model)[1])


def from_section(cls, section, **extra):
    """A config dataclass from the ConfigDict section fields of the same names."""
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{k: section[k] for k in names if k in section}, **extra)


def _validate(cfg) -> None:
    """Checks the parts of a run config that need no devices or files."""
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps={cfg.train.steps} must be >= 1")
    if cfg.train.log_every < 1:
        raise ConfigError(f"train.log_every={cfg.train.log_every} must be >= 1")
    for name in ("dtype", "param_dtype"):
        value = cfg.model[name]
        if value not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.{name}={value!r}; expected float32, bfloat16 or float16")


def resolve_model_config(model_cfg) -> LlamaConfig:
    """The LlamaConfig of a config's `model` section: read from `model_dir`, or its
    `preset` with `overrides` applied."""
    if model_cfg.model_dir:
        if model_cfg.get("overrides"):
            raise ConfigError("model.overrides applies to presets, not to model.model_dir")
        return model_dir.read_config(model_cfg.model_dir)
    try:
        config = get_preset(model_cfg.preset)
        return apply_overrides(config, model_cfg.get("overrides", ""))
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from e


def apply_overrides(config, spec: str):
    """A LlamaConfig with 'name=value,...' fields replaced (ints, floats, booleans)."""
    if not spec:
        return config
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, text = item.partition("=")
        name = name.strip()
        if name not in fields or name in ("rope_scaling", "eos_token_ids"):
            raise ConfigError(
                f"model.overrides: {name!r} is not a scalar LlamaConfig field; expected one "
                f"of {sorted(k for k in fields if k not in ('rope_scaling', 'eos_token_ids'))}"
            )
        current = getattr(config, name)
        try:
            if isinstance(current, bool):
                value = {"true": True, "false": False}[text.strip().lower()]
            elif isinstance(current, int):
                value = int(text)
            else:
                value = float(text)
        except (KeyError, ValueError):
            raise ConfigError(f"model.overrides: {item!r} has an unreadable value") from None
        changes[name] = value
    return dataclasses.replace(config, **changes)


def _check_resumable(saved: Mapping[str, Any], cfg) -> None:
    """The data position only means the same batches if the data settings match."""
    keys = ("path", "format", "field", "seq_len", "global_batch", "seed", "add_bos", "add_eos")
    before, now = saved.get("data", {}), cfg.data
    changed = [k for k in keys if k in before and before[k] != now[k]]
    if changed:
        diffs = ", ".join(f"data.{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"the checkpoint was written with other data settings ({diffs}); resuming would "
            "not see the batches the run would have. Use a new workdir or the old settings."
        )
    # The pruning masks and schedule live in the optimizer state being restored.
    prune_before, prune_now = saved.get("prune"), cfg.get("prune")
    if prune.from_config(prune_before) != prune.from_config(prune_now):
        raise ConfigError(
            f"the checkpoint was written with prune settings {prune_before}, not "
            f"{None if prune_now is None else prune_now.to_dict()}; resume with the same "
            "prune block or use a new workdir"
        )


@dataclasses.dataclass
class Plan:
    """A run's checked settings and its mesh: all that building its step needs. The
    global batch is int32[B, T] (`batch_shape`) sharded by `batch_sh`."""

    mesh: Any
    rules: Any
    opt_cfg: OptimizerConfig
    model_config: Any
    batch_sh: NamedSharding
    batch_shape: tuple[int, int]


@dataclasses.dataclass
class Setup(Plan):
    """A Plan, the tokenizer and the data iterator: all of it checked."""

    tokenizer: Any = None
    iterator: Any = None


def plan(cfg, model_config=None, devices=None) -> Plan:
    """Checks the config, mesh, batch split and model config, and builds the mesh over
    `devices` (default: all), reading no data. model_config: default from cfg.model."""
    _validate(cfg)
    mesh = sharding.create_mesh(
        dcn=cfg.mesh.dcn,
        data=cfg.mesh.data,
        fsdp=cfg.mesh.fsdp,
        tensor=cfg.mesh.tensor,
        devices=devices,
    )
    rules = sharding.rules_from_config(sharding.parse_rules(cfg.mesh.rules))
    check_batch(cfg.data.global_batch, cfg.train.grad_accum, mesh, rules)
    opt_cfg = from_section(OptimizerConfig, cfg.train, total_steps=cfg.train.steps)
    model_config = model_config or resolve_model_config(cfg.model)
    shape = (cfg.data.global_batch, cfg.data.seq_len)
    return Plan(mesh, rules, opt_cfg, model_config, batch_sharding(mesh, rules, shape), shape)


def setup(cfg, model_config=None) -> Setup:
    """`plan`, then checks the tokenizer and data and builds the data iterator."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty; give the training data file")
    p = plan(cfg, model_config)
    data_cfg = from_section(data.DataConfig, cfg.data)
    if not epath.Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path} does not exist")
    tokenizer = None
    if cfg.data.tokenizer:
        tok_path = cfg.data.tokenizer
        is_dir = epath.Path(tok_path).is_dir()
        tokenizer = Tokenizer.from_dir(tok_path) if is_dir else Tokenizer.from_file(tok_path)
        if tokenizer.vocab_size > p.model_config.vocab_size:
            raise ConfigError(
                f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's "
                f"{p.model_config.vocab_size}"
            )
    elif cfg.data.format != "tokens":
        raise ConfigError(f"data.format={cfg.data.format!r} needs data.tokenizer")
    iterator = data.DataIterator(
        data_cfg, tokenizer, p.batch_sh, vocab_size=p.model_config.vocab_size
    )
    return Setup(**vars(p), tokenizer=tokenizer, iterator=iterator)


@dataclasses.dataclass(frozen=True)
class Step:
    """A run's step jitted with its shardings (the state donated), and the abstract
    arguments it is called with: `fn(*args())`, i.e. fn(state, batch) or fn(state,
    batch, frozen). Built from shapes alone, so it can also be compiled ahead of time.

    state: TrainState of ShapeDtypeStructs with shardings; batch: data.FIELDS ->
    int32[B, T]; frozen: parameters passed to the step but not trained (the teacher's,
    a LoRA base's) as ShapeDtypeStructs with shardings, or None; frozen_name says which.
    """

    fn: Any
    tx: optax.GradientTransformation
    shardings: TrainState
    state: TrainState
    batch: dict[str, jax.ShapeDtypeStruct]
    frozen: Any = None
    frozen_name: str = ""

    def args(self) -> tuple:
        return (self.state, self.batch) + (() if self.frozen is None else (self.frozen,))


def jit_step(step_fn, tx, p: Plan, abstract_params, frozen=None, frozen_name="") -> Step:
    """Jits step_fn(state, batch[, frozen]) (from `make_step`) for the parameters
    `abstract_params` (ShapeDtypeStructs with shardings) on p's mesh."""
    shardings = state_shardings(abstract_params, tx, p.mesh)
    extra = () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)
    batch = {
        k: jax.ShapeDtypeStruct(p.batch_shape, jnp.int32, sharding=p.batch_sh) for k in data.FIELDS
    }
    return Step(
        fn=jit_train_step(step_fn, shardings, p.batch_sh, *extra),
        tx=tx,
        shardings=shardings,
        state=abstract_train_state(abstract_params, tx, shardings),
        batch=batch,
        frozen=frozen,
        frozen_name=frozen_name,
    )


def train_step(cfg, p: Plan, graphdef, abstract_params) -> Step:
    """The jitted training step of `cfg` for a model (graphdef, abstract parameters
    with shardings, from `abstract_model`)."""
    tx = build_optimizer(cfg, p.opt_cfg, abstract_params)
    step_fn = make_train_step(
        graphdef,
        tx,
        learning_rate_schedule(p.opt_cfg),
        grad_accum=cfg.train.grad_accum,
        loss_chunk=cfg.train.loss_chunk,
    )
    return jit_step(step_fn, tx, p, abstract_params)


def abstract_model(model_config, model_cfg, mesh, rules, seed: int = 0):
    """(make_model, graphdef, abstract params with their shardings) of a model."""

    def make_model():
        return Llama(model_config, rngs=nnx.Rngs(seed), **model_kwargs(model_cfg))

    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))
    abstract_params = jax.tree.map(
        lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
        nnx.to_pure_dict(abstract),
        param_sh,
    )
    return make_model, graphdef, abstract_params


def abstract_train_state(abstract_params, tx, shardings: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        jax.eval_shape(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params
        ),
        shardings,
    )


def matmul_flops_per_token(model_config, seq_len: int, *, frozen: bool = False) -> float:
    """Training FLOPs per token; the input embedding is a lookup, not a matmul. frozen:
    the weights take no gradient (a LoRA base: 4 FLOPs per weight, not 6; the small
    adapters are not counted)."""
    matmul_params = model_config.num_params() - (
        0 if model_config.tie_word_embeddings else model_config.vocab_size * model_config.embed_dim
    )
    flops = metrics.train_flops_per_token(
        matmul_params,
        model_config.num_layers,
        model_config.num_heads,
        model_config.head_dim,
        seq_len,
    )
    return flops - 2.0 * matmul_params if frozen else flops


def loop(
    cfg,
    workdir,
    state,
    step_fn,
    iterator,
    ckpt,
    meta,
    *,
    flops_per_token: float,
    on_log=None,
) -> dict[str, float]:
    """Runs `state, metrics = step_fn(state, batch)` from state.step to cfg.train.steps:
    logs, checks finiteness, saves (and on SIGTERM saves and stops). on_log(step,
    metrics) may add entries to a logged step's metrics (e.g. an evaluation).
    Returns the last logged metrics."""
    start = int(state.step)
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    total = cfg.train.steps
    last: dict[str, float] = {}
    # Leaving the block (also by an error) waits for an asynchronous save in flight, so
    # the last good checkpoint is complete on disk.
    with (
        ckpt,
        metrics.MetricsWriter(workdir) as writer,
        checkpoint.PreemptionWatch(check_every=cfg.train.log_every) as preemption,
    ):
        throughput = None
        pending: list[tuple[int, dict]] = []
        step = logged = start
        while step < total:
            state, m = step_fn(state, next(iterator))
            step += 1
            pending.append((step, m))
            if throughput is None:
                # Time from the end of the first (compiling) step.
                jax.block_until_ready(m)
                throughput = metrics.Throughput(flops_per_token, total_steps=total, start_step=step)
                logged = step
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
                    last |= on_log(step, state)
                writer.write(step, last)
                log_info("%s", metrics.progress_line(step, total, last))
            if saving:
                ckpt.save(step, state, meta(), force=step == total or stop)
            if stop:
                log_info("preemption notice: saved step %d, stopping", step)
                break
    return last


def open_run(cfg, workdir) -> tuple[epath.Path, Any]:
    """The run's workdir (created if missing) and its checkpoint manager."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.checkpoint.save_every,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    return workdir, ckpt


def resume(ckpt, cfg, iterator, abstract_params, tx, shardings) -> tuple[TrainState, dict]:
    """Restores the latest checkpoint onto `shardings`, checks that it resumes this
    config, and moves the data iterator to where it stopped. Returns (state, meta)."""
    abstract = abstract_train_state(abstract_params, tx, shardings)
    restored_step, state, meta = ckpt.restore(abstract)
    _check_resumable(meta["config"], cfg)
    iterator.restore(meta["data"])
    log_info("resumed from step %d", restored_step)
    return state, meta


def run(cfg, workdir: str) -> dict[str, float]:
    """Trains per `cfg` (configs/base.py layout) in `workdir`, resuming from its latest
    complete checkpoint. Returns the last logged metrics.

    Everything that can be checked (config, mesh, batch split, model config, tokenizer,
    data) is checked before anything is compiled or initialised. With `lora.rank` > 0
    this is `run_lora`.
    """

    if cfg.get("lora") is not None and cfg.lora.rank != 0:
        return run_lora(cfg, workdir)
    su = setup(cfg)
    make_model, graphdef, abstract_params = abstract_model(
        su.model_config, cfg.model, su.mesh, su.rules, cfg.train.seed
    )
    step = train_step(cfg, su, graphdef, abstract_params)

    workdir, ckpt = open_run(cfg, workdir)
    if ckpt.latest_step() is not None:
        state, _ = resume(ckpt, cfg, su.iterator, abstract_params, step.tx, step.shardings)
    else:
        params = initial_params(cfg.model, su.model_config, make_model, su.mesh, su.rules)
        state, _ = init_state(params, step.tx, su.mesh)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", cfg.to_dict())

    def meta() -> dict[str, Any]:
        return {
            "data": su.iterator.state(),
            "config": cfg.to_dict(),
            "model": su.model_config.to_dict(),
        }

    with sharding.activation_sharding(su.mesh, su.rules):
        return loop(
            cfg,
            workdir,
            state,
            step.fn,
            su.iterator,
            ckpt,
            meta,
            flops_per_token=matmul_flops_per_token(su.model_config, cfg.data.seq_len),
            on_log=lambda _, state: prune_metrics(state.opt_state),
        )


def lora_options(cfg):
    """The run's checked LoraConfig (LoRA is on: lora.rank != 0)."""
    lora_cfg = lora.from_config(cfg.lora)
    if prune.from_config(cfg.get("prune")) is not None:
        raise ConfigError(
            "prune and lora cannot be combined: with LoRA only the adapters train, and "
            "pruning masks the trained weights; prune the merged model instead"
        )
    return lora_cfg


def _check_same_lora(saved: Mapping[str, Any] | None, now: Mapping[str, Any], workdir) -> None:
    """A resume must train the adapters it restores: same rank, alpha, dropout, targets."""
    if saved is None:
        raise ConfigError(
            f"{workdir} holds a full training run, not LoRA adapters; use a new workdir"
        )
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"lora.{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"the checkpoint's adapters were trained with other LoRA settings ({diffs}); "
            "resume with those or use a new workdir"
        )


def abstract_lora(cfg, p: Plan, lora_cfg, base_dir: str = ""):
    """(make_model, graphdef, abstract adapters, abstract frozen base) of a LoRA run,
    the abstract parameters ShapeDtypeStructs with shardings. The base is as stored in
    `base_dir` (dtype and quantization); without one, float in model.dtype."""
    base_quant = model_dir.quant_kwargs(base_dir) if base_dir else {"quantization": None}
    dtype = model_dir.stored_float_dtype(base_dir) if base_dir else jnp.dtype(cfg.model.dtype)

    def make_model():
        return Llama(
            p.model_config,
            lora=lora_cfg,
            rngs=nnx.Rngs(cfg.train.seed),
            **model_kwargs(cfg.model),
            **quant.model_kwargs(**base_quant),
        )

    graphdef, abstract_adapters = lora.abstract_model(make_model, p.mesh, p.rules)
    _, abstract_base = model_dir.abstract_params(
        p.model_config, p.mesh, p.rules, dtype=dtype, **base_quant
    )
    return make_model, graphdef, abstract_adapters, abstract_base


def lora_step(cfg, p: Plan, lora_cfg, graphdef, abstract_adapters, abstract_base) -> Step:
    """The jitted LoRA step of `cfg`, step(state, batch, base_params), for the parts
    from `abstract_lora`."""
    tx = make_optimizer(p.opt_cfg)
    step_fn = make_lora_train_step(
        graphdef,
        tx,
        learning_rate_schedule(p.opt_cfg),
        grad_accum=cfg.train.grad_accum,
        loss_chunk=cfg.train.loss_chunk,
        dropout_seed=cfg.train.seed if lora_cfg.dropout > 0 else None,
    )
    return jit_step(step_fn, tx, p, abstract_adapters, abstract_base, "frozen base")


def run_lora(cfg, workdir: str) -> dict[str, float]:
    """Trains LoRA adapters per `cfg` (its `lora` block) over the frozen base in
    `model.model_dir` (any model directory kind, float or int8), resuming from the
    latest complete checkpoint in `workdir`. Returns the last logged metrics.

    The base is loaded as stored (dtype and quantization) and passed to the jitted step
    as a non-donated argument; the state, the optimizer state and the checkpoints hold
    only the adapters. The checkpoint metadata's `lora` entry records the settings and
    the base's path and fingerprint: a resume with other settings or another base is
    refused, and the model directory readers merge the adapters onto that base.
    """
    lora_cfg = lora_options(cfg)
    if not cfg.model.model_dir:
        raise ConfigError(
            f"lora.rank={cfg.lora.rank} needs model.model_dir: the frozen base model the "
            "adapters are trained on (Hugging Face, converted, or a run)"
        )
    su = setup(cfg)
    config, base_dir = su.model_config, cfg.model.model_dir
    make_model, graphdef, abstract_adapters, abstract_base = abstract_lora(
        cfg, su, lora_cfg, base_dir
    )
    step = lora_step(cfg, su, lora_cfg, graphdef, abstract_adapters, abstract_base)
    tx, shardings = step.tx, step.shardings

    workdir, ckpt = open_run(cfg, workdir)
    resuming = ckpt.latest_step() is not None
    lora_meta = lora.to_meta(lora_cfg)
    if resuming:
        saved = model_dir.lora_info(workdir)
        _check_same_lora(saved, lora_meta, workdir)
    log_info("loading the frozen base from %s", base_dir)
    base = model_dir.load_params(base_dir, config, abstract_base)
    lora_meta["base"] = {
        "path": str(epath.Path(base_dir).resolve()),
        "fingerprint": checkpoint.fingerprint(config, base),
    }
    if resuming:
        lora_dir.check_lora_base(saved, lora_meta["base"]["fingerprint"], base_dir)
        state, _ = resume(ckpt, cfg, su.iterator, abstract_adapters, tx, shardings)
    else:
        adapters = lora.init_adapters(make_model, abstract_adapters)
        state, _ = init_state(adapters, tx, su.mesh)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", cfg.to_dict())

    def step_fn(state, batch):
        return step.fn(state, batch, base)

    def meta() -> dict[str, Any]:
        return {
            "data": su.iterator.state(),
            "config": cfg.to_dict(),
            "model": config.to_dict(),
            "lora": lora_meta,
        }

    with sharding.activation_sharding(su.mesh, su.rules):
        return loop(
            cfg,
            workdir,
            state,
            step_fn,
            su.iterator,
            ckpt,
            meta,
            flops_per_token=matmul_flops_per_token(config, cfg.data.seq_len, frozen=True),
        )


def log_info(msg: str, *args) -> None:
    """Progress for people: stdout on process 0 (and the absl log)."""
    if jax.process_index() == 0:
        logging.info(msg, *args)
        print(msg % args, flush=True)
