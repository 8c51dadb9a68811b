"""The jitted, sharded training step: its state, the loss-to-update step shared by
every kind of run, the shardings of the state, and a run's `Plan` (mesh, rules, batch
layout) from which a `Step` is built from shapes alone.

State is plain pytrees: `params` (the model's parameters as a nested dict, float32
master weights), `opt_state` (optax) and `step`. The step runs under `jax.jit` with
explicit shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import compress, data, sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.nn import Llama, token_loss_sum
from llama_jax.train import metrics
from llama_jax.train.optim import OptimizerConfig
from llama_jax.train.run_config import ModelSpec, RunConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # int32[]
    params: Any  # nested dict of arrays, the model's parameters
    opt_state: Any


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
                mb = {
                    k: sharding.constrain(v, ("batch", "length") + (None,) * (v.ndim - 2))
                    for k, v in mb.items()
                }
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
            keys = compress.dropout_keys(dropout_seed, step, micro["rows"][:, 0])
        model = nnx.merge(graphdef, compress.combine(base_params, adapters))
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


def abstract_model(model_config: LlamaConfig, spec: ModelSpec, mesh, rules, seed: int = 0):
    """(make_model, graphdef, abstract params with their shardings) of a model."""

    def make_model():
        return Llama(model_config, rngs=nnx.Rngs(seed), **spec.kwargs())

    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    return make_model, graphdef, sharding.abstract_arrays(abstract, mesh, rules)


def abstract_train_state(abstract_params, tx, shardings: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        jax.eval_shape(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params
        ),
        shardings,
    )


@dataclasses.dataclass
class Plan:
    """A run's checked config and its mesh: all that building its step needs. The
    global batch is int32[B, T] (`batch_shape`) sharded by `batch_sh`."""

    cfg: RunConfig
    mesh: Any
    rules: Any
    model_config: LlamaConfig
    batch_sh: NamedSharding
    batch_shape: tuple[int, int]

    @property
    def opt_cfg(self) -> OptimizerConfig:
        return self.cfg.train.optimizer


def plan(cfg: RunConfig, model_config: LlamaConfig, devices=None) -> Plan:
    """Builds the mesh over `devices` (default: all) and checks that the batch splits
    over it, reading no data. model_config: the trained model's architecture."""
    mesh = sharding.create_mesh(**cfg.mesh.sizes(), devices=devices)
    rules = cfg.mesh.rules_table()
    check_batch(cfg.data.global_batch, cfg.train.grad_accum, mesh, rules)
    shape = (cfg.data.global_batch, cfg.data.seq_len)
    return Plan(cfg, mesh, rules, model_config, batch_sharding(mesh, rules, shape), shape)


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


def jit_step(
    step_fn, tx, p: Plan, abstract_params, frozen=None, frozen_name="", extra_batch=None
) -> Step:
    """Jits step_fn(state, batch[, frozen]) (from `make_step`) for the parameters
    `abstract_params` (ShapeDtypeStructs with shardings) on p's mesh. extra_batch: batch
    entries besides data.FIELDS, as ShapeDtypeStructs [B, T, ...] sharded like the
    batch on B and T."""
    shardings = state_shardings(abstract_params, tx, p.mesh)
    extra = () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)
    batch = {
        k: jax.ShapeDtypeStruct(p.batch_shape, jnp.int32, sharding=p.batch_sh) for k in data.FIELDS
    } | dict(extra_batch or {})
    return Step(
        fn=jit_train_step(step_fn, shardings, p.batch_sh, *extra),
        tx=tx,
        shardings=shardings,
        state=abstract_train_state(abstract_params, tx, shardings),
        batch=batch,
        frozen=frozen,
        frozen_name=frozen_name,
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
