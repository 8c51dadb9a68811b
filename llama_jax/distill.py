"""Teacher-student distillation: the distill step and its loop.

The student trains exactly as in `train.py` (same state, optimizer, checkpoints, data,
metrics, preemption and NaN guard); its loss is `losses.chunked_distill_loss` against
a frozen teacher on the same mesh and sharding rules. The teacher has no gradients and
no optimizer state and is never saved: checkpoints record where it came from and a
fingerprint of its config and parameters, and a resume with another teacher is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from llama_jax import checkpoint, data, model_dir, sharding, train
from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.losses import DistillLossConfig, chunked_distill_loss, make_eval_step
from llama_jax.train import log_info


def linear_schedule(start: float, end: float, total_steps: int):
    """step -> start + (end - start) * step / total_steps, or `start` when end < 0."""
    if end < 0:
        return lambda step: jnp.asarray(start, jnp.float32)
    return lambda step: start + (end - start) * jnp.minimum(step / total_steps, 1.0)


def make_distill_step(
    student_graphdef,
    teacher_graphdef,
    tx,
    schedule,
    loss_cfg: DistillLossConfig,
    *,
    alpha_fn,
    temperature_fn,
    grad_accum: int = 1,
    loss_chunk: int = 512,
):
    """Returns step(state, batch, teacher_params) -> (state, metrics), not yet jitted.

    The teacher's hidden states are computed without gradients; the loss is
    alpha * KD + (1 - alpha) * CE with alpha and the temperature following
    `alpha_fn(step)` and `temperature_fn(step)`. Metrics add `kd`, `ce`, `alpha` and
    `temperature` to the training ones.
    """

    def loss_sum(params, micro, step, teacher_params):
        student = nnx.merge(student_graphdef, params)
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
        kwargs = dict(segment_ids_BT=micro["segment_ids"])
        h_teacher, _ = teacher.hidden_states(micro["tokens"], **kwargs)
        h_student, _ = student.hidden_states(micro["tokens"], **kwargs)
        alpha, temperature = alpha_fn(step), temperature_fn(step)
        out = chunked_distill_loss(
            h_student,
            lambda h: student.unembed(h, out_dtype=jnp.float32),
            jax.lax.stop_gradient(h_teacher),
            lambda h: teacher.unembed(h, out_dtype=jnp.float32),
            micro["targets"],
            micro["loss_mask"],
            loss_cfg,
            chunk=loss_chunk,
            alpha=alpha,
            temperature=temperature,
        )
        count = out["count"]
        aux = {
            "count": count,
            "kd": out["kd_sum"],
            "ce": out["ce_sum"],
            # Reported as means over tokens like the sums, so weight them by the count.
            "alpha": alpha * count,
            "temperature": temperature * count,
        }
        return out["loss_sum"], aux

    return train.make_step(loss_sum, tx, schedule, grad_accum=grad_accum)


def perplexity(eval_fn, params, batches) -> float:
    """exp(mean token loss) over `batches`."""
    total = count = 0.0
    for batch in batches:
        t, c = jax.device_get(eval_fn(params, batch))
        total += float(t)
        count += float(c)
    if count == 0:
        raise ConfigError("the evaluation data has no tokens to score")
    return float(np.exp(total / count))


def check_same_teacher(saved: Mapping[str, Any], now: Mapping[str, Any], source: str) -> None:
    """Raises unless `now` (this run's teacher) matches the checkpoint's `saved`."""
    why = checkpoint.fingerprint_mismatch(saved["fingerprint"], now["fingerprint"])
    if why is not None:
        raise ConfigError(
            f"the teacher at {source} has {why} than the one this run was distilled from "
            f"({saved['source']}); use that teacher or a new workdir"
        )


def parse_layer_map(spec: str, teacher_layers: int) -> list[int]:
    """'0,2,4' or 'every_other' (0, 2, 4, ...) or 'first:N' -> teacher layer indices."""
    spec = spec.strip()
    if spec == "every_other":
        layers = list(range(0, teacher_layers, 2))
    elif spec.startswith("first:"):
        layers = list(range(int(spec.split(":", 1)[1])))
    else:
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"model.teacher_layers={spec!r}; expected '0,2,4', 'every_other' or 'first:N'"
            ) from None
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if not layers or bad:
        raise ConfigError(
            f"model.teacher_layers={spec!r} picks {layers}; expected indices in "
            f"[0, {teacher_layers}) of the teacher's layers"
        )
    return layers


def student_model_config(cfg, teacher_config: LlamaConfig) -> LlamaConfig:
    """The student's architecture: the teacher's with `model.teacher_layers` picked, or
    from `model` (preset or model directory)."""
    if cfg.model.teacher_layers:
        if cfg.teacher.model_dir and model_dir.quantization(cfg.teacher.model_dir):
            raise ConfigError("model.teacher_layers needs a float teacher; this one is quantized")
        if cfg.model.model_dir:
            raise ConfigError("set model.model_dir or model.teacher_layers, not both")
        layers = parse_layer_map(cfg.model.teacher_layers, teacher_config.num_layers)
        return dataclasses.replace(teacher_config, num_layers=len(layers))
    return train.resolve_model_config(cfg.model)


def _teacher_kwargs(cfg) -> dict[str, Any]:
    return dict(
        dtype=jnp.dtype(cfg.teacher.dtype),
        param_dtype=jnp.dtype(cfg.teacher.dtype),
        scan_layers=cfg.teacher.scan_layers,
        remat_policy="none",
        attention_impl=cfg.teacher.attention_impl,
    )


def _check_sections(cfg) -> None:
    if not cfg.teacher.model_dir:
        raise ConfigError("teacher.model_dir is empty; give the teacher's model directory")
    if not epath.Path(cfg.teacher.model_dir).exists():
        raise ConfigError(f"teacher.model_dir={cfg.teacher.model_dir} does not exist")
    if cfg.teacher.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"teacher.dtype={cfg.teacher.dtype!r}; expected float32, bfloat16 or float16"
        )
    if cfg.distill.eval_every < 0 or cfg.distill.eval_batches < 1:
        raise ConfigError(
            f"distill.eval_every={cfg.distill.eval_every} must be >= 0 and "
            f"distill.eval_batches={cfg.distill.eval_batches} >= 1"
        )
    if cfg.distill.eval_path and not epath.Path(cfg.distill.eval_path).exists():
        raise ConfigError(f"distill.eval_path={cfg.distill.eval_path} does not exist")
    if cfg.get("lora") is not None and cfg.lora.rank:
        raise ConfigError(
            f"lora.rank={cfg.lora.rank}: distillation trains the whole student; LoRA "
            "adapters are for launch.train (set lora.rank=0)"
        )


def loss_config(cfg) -> DistillLossConfig:
    d = cfg.distill
    return DistillLossConfig(
        kind=d.kind, temperature=d.temperature, alpha=d.alpha, beta=d.beta, top_k=d.top_k
    )


def check_pair(cfg, student_config: LlamaConfig, teacher_config: LlamaConfig) -> None:
    """Raises unless the student and teacher share a vocabulary that distill.top_k fits."""
    loss_cfg = loss_config(cfg)
    teacher = cfg.teacher.model_dir or cfg.teacher.get("preset", "")
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"student vocabulary {student_config.vocab_size} and teacher vocabulary "
            f"{teacher_config.vocab_size} ({teacher}) differ; distillation "
            "needs the same vocabulary"
        )
    if loss_cfg.top_k > teacher_config.vocab_size:
        raise ConfigError(
            f"distill.top_k={loss_cfg.top_k} exceeds the vocabulary ({teacher_config.vocab_size})"
        )


def abstract_teacher(cfg, teacher_config: LlamaConfig, mesh, rules):
    """(graphdef, abstract parameters with shardings) of the teacher: as stored in
    `teacher.model_dir` (int8 or float), or float without one; computed in
    teacher.dtype."""
    quant = model_dir.quant_kwargs(cfg.teacher.model_dir) if cfg.teacher.model_dir else {}
    return model_dir.abstract_params(teacher_config, mesh, rules, **quant, **_teacher_kwargs(cfg))


def distill_step(
    cfg, p: train.Plan, student_graphdef, abstract_student, teacher_graphdef, abstract_teacher
) -> train.Step:
    """The jitted distillation step of `cfg`, step(state, batch, teacher_params), for a
    student (graphdef, abstract parameters from `train.abstract_model`) and a teacher
    (from `abstract_teacher`)."""
    tx = train.build_optimizer(cfg, p.opt_cfg, abstract_student)
    total = cfg.train.steps
    step_fn = make_distill_step(
        student_graphdef,
        teacher_graphdef,
        tx,
        train.learning_rate_schedule(p.opt_cfg),
        loss_config(cfg),
        alpha_fn=linear_schedule(cfg.distill.alpha, cfg.distill.alpha_end, total),
        temperature_fn=linear_schedule(cfg.distill.temperature, cfg.distill.temperature_end, total),
        grad_accum=cfg.train.grad_accum,
        loss_chunk=cfg.train.loss_chunk,
    )
    return train.jit_step(step_fn, tx, p, abstract_student, abstract_teacher, "teacher")


def _eval_batches(cfg, su) -> list[dict[str, jax.Array]]:
    eval_cfg = train.from_section(data.DataConfig, cfg.data, path=cfg.distill.eval_path)
    iterator = data.DataIterator(
        eval_cfg, su.tokenizer, su.batch_sh, vocab_size=su.model_config.vocab_size
    )
    return [next(iterator) for _ in range(cfg.distill.eval_batches)]


def run(cfg, workdir: str) -> dict[str, float]:
    """Distils per `cfg` (configs/base.py `distill_config` layout) in `workdir`,
    resuming from its latest complete checkpoint. Returns the last logged metrics.

    Config, teacher directory and architecture, vocabularies, mesh, batch split,
    tokenizer and data are all checked before anything is compiled or initialised.
    """
    _check_sections(cfg)
    teacher_config = model_dir.read_config(cfg.teacher.model_dir)
    student_config = student_model_config(cfg, teacher_config)
    check_pair(cfg, student_config, teacher_config)
    su = train.setup(cfg, student_config)
    eval_batches = _eval_batches(cfg, su) if cfg.distill.eval_path else []

    make_student, student_graphdef, abstract_student = train.abstract_model(
        student_config, cfg.model, su.mesh, su.rules, cfg.train.seed
    )
    teacher_graphdef, teacher_abstract = abstract_teacher(cfg, teacher_config, su.mesh, su.rules)
    step = distill_step(
        cfg, su, student_graphdef, abstract_student, teacher_graphdef, teacher_abstract
    )
    tx, shardings = step.tx, step.shardings

    log_info("loading the teacher from %s", cfg.teacher.model_dir)
    teacher_params = model_dir.load_params(cfg.teacher.model_dir, teacher_config, teacher_abstract)
    teacher_meta = {
        "source": str(cfg.teacher.model_dir),
        "fingerprint": checkpoint.fingerprint(teacher_config, teacher_params),
    }

    workdir, ckpt = train.open_run(cfg, workdir)
    if ckpt.latest_step() is not None:
        state, meta = train.resume(ckpt, cfg, su.iterator, abstract_student, tx, shardings)
        check_same_teacher(meta["teacher"], teacher_meta, cfg.teacher.model_dir)
    else:
        params = _initial_student(cfg, student_config, make_student, teacher_params, su)
        state, _ = train.init_state(params, tx, su.mesh)
    if jax.process_index() == 0:
        train.write_json(workdir / "config.json", cfg.to_dict())

    total = cfg.train.steps

    def step_fn(state, batch):
        return step.fn(state, batch, teacher_params)

    student_eval = make_eval_step(student_graphdef, cfg.train.loss_chunk)
    teacher_ppl: list[float] = []

    def on_log(step_no, state) -> dict[str, float]:
        out = train.prune_metrics(state.opt_state)
        if not eval_batches:
            return out
        every = cfg.distill.eval_every
        if not (step_no == total or (every and step_no % every == 0)):
            return out
        out["eval_ppl"] = perplexity(student_eval, state.params, eval_batches)
        if not teacher_ppl:
            teacher_eval = make_eval_step(teacher_graphdef, cfg.train.loss_chunk)
            teacher_ppl.append(perplexity(teacher_eval, teacher_params, eval_batches))
        return out | {"teacher_eval_ppl": teacher_ppl[0]}

    def meta() -> dict[str, Any]:
        return {
            "data": su.iterator.state(),
            "config": cfg.to_dict(),
            "model": student_config.to_dict(),
            "teacher": teacher_meta,
        }

    student_flops = train.matmul_flops_per_token(student_config, cfg.data.seq_len)
    # The teacher runs forward only: a third of its training FLOPs.
    teacher_flops = train.matmul_flops_per_token(teacher_config, cfg.data.seq_len) / 3
    with sharding.activation_sharding(su.mesh, su.rules):
        return train.loop(
            cfg,
            workdir,
            state,
            step_fn,
            su.iterator,
            ckpt,
            meta,
            flops_per_token=student_flops + teacher_flops,
            on_log=on_log,
        )


def _initial_student(cfg, student_config, make_student, teacher_params, su):
    """Random, a model directory, or a subset of the teacher's layers."""
    if not cfg.model.teacher_layers:
        return train.initial_params(cfg.model, student_config, make_student, su.mesh, su.rules)
    layers = jnp.asarray(parse_layer_map(cfg.model.teacher_layers, len_layers(teacher_params)))
    _, abstract = nnx.split(nnx.eval_shape(make_student))
    target_sh = nnx.to_pure_dict(sharding.state_shardings(abstract, su.mesh, su.rules))
    dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(abstract))

    def pick(params):
        out = dict(params)
        out["layers"] = jax.tree.map(lambda x: jnp.take(x, layers, axis=0), params["layers"])
        return jax.tree.map(lambda x, dt: x.astype(dt), out, dtypes)

    return jax.jit(pick, out_shardings=target_sh)(teacher_params)


def len_layers(params) -> int:
    return jax.tree.leaves(params["layers"])[0].shape[0]
