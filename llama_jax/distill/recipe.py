"""Teacher-student distillation: the distill step and the `Distillation` recipe.

The student trains exactly as in `train.py` (same state, optimizer, checkpoints, data,
metrics, preemption and NaN guard); its loss is `losses.chunked_distill_loss` against
a frozen teacher on the same mesh and sharding rules. The teacher has no gradients and
no optimizer state and is never saved: checkpoints record where it came from and a
fingerprint of its config and parameters, and a resume with another teacher is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from llama_jax import compress, data, formats, nn, sharding, train
from llama_jax.config import LlamaConfig
from llama_jax.distill import cache as logit_cache
from llama_jax.distill import on_policy
from llama_jax.distill.spec import DistillConfig, typed_config
from llama_jax.distill.step import PROJECTION, feature_match, linear_schedule, make_distill_step
from llama_jax.errors import ConfigError, DataError
from llama_jax.nn import make_eval_step


def heldout_perplexity(eval_fn, params, batches) -> float:
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
    why = formats.fingerprint_mismatch(saved["fingerprint"], now["fingerprint"])
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


def student_model_config(
    cfg: DistillConfig,
    teacher_config: LlamaConfig,
    teacher: formats.ModelDir | None,
    student_dir: formats.ModelDir | None,
) -> LlamaConfig:
    """The student's architecture: the teacher's with `model.teacher_layers` picked, the
    structured targets' slice of it, or from `model` (its model directory `student_dir`,
    or its preset)."""
    if cfg.model.teacher_layers:
        if teacher is not None and teacher.quantization:
            raise ConfigError("model.teacher_layers needs a float teacher; this one is quantized")
        if cfg.model.model_dir:
            raise ConfigError("set model.model_dir or model.teacher_layers, not both")
        layers = parse_layer_map(cfg.model.teacher_layers, teacher_config.num_layers)
        return dataclasses.replace(teacher_config, num_layers=len(layers))
    if cfg.structured is not None:
        pruned = compress.target_config(teacher_config, cfg.structured)
        # The recipes also give the shape as preset overrides, for ahead-of-time
        # compilation without the teacher's directory: they must agree.
        if cfg.model.overrides and cfg.model.preset_config() != pruned:
            raise ConfigError(
                f"model.preset={cfg.model.preset!r} with model.overrides gives "
                f"{cfg.model.preset_config()}, but the structured targets make the teacher "
                f"{pruned}; make them agree or drop model.overrides"
            )
        return pruned
    return student_dir.config if student_dir is not None else cfg.model.preset_config()


def check_pair(
    cfg: DistillConfig, student_config: LlamaConfig, teacher_config: LlamaConfig
) -> None:
    """Raises unless the student and teacher share a vocabulary that distill.top_k fits."""
    teacher = cfg.teacher.model_dir or cfg.teacher.preset
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"student vocabulary {student_config.vocab_size} and teacher vocabulary "
            f"{teacher_config.vocab_size} ({teacher}) differ; distillation "
            "needs the same vocabulary"
        )
    top_k = cfg.distill.loss.top_k
    if top_k > teacher_config.vocab_size:
        raise ConfigError(
            f"distill.top_k={top_k} exceeds the vocabulary ({teacher_config.vocab_size})"
        )


def abstract_teacher(cfg: DistillConfig, teacher_config: LlamaConfig, teacher, mesh, rules):
    """(graphdef, abstract parameters with shardings) of the teacher: as stored in
    `teacher` (its ModelDir: int8 or float), or float without one; computed in
    teacher.dtype."""
    if teacher is not None:
        return teacher.abstract(mesh, rules, **cfg.teacher.kwargs())
    return nn.abstract_params(teacher_config, mesh, rules, **cfg.teacher.kwargs())


def load_teacher(cfg: DistillConfig, teacher: formats.ModelDir, mesh, rules):
    """(graphdef, parameters on the mesh, fingerprint) of the frozen teacher, read as
    stored into teacher.dtype."""
    graphdef, abstract = abstract_teacher(cfg, teacher.config, teacher, mesh, rules)
    train.log_info("loading the teacher from %s", teacher)
    params = teacher.load_params(abstract)
    return graphdef, params, teacher.fingerprint(params)


class Distillation(train.Recipe):
    """The student trains against a frozen teacher on the same mesh and rules. The
    teacher is passed to the step as a non-donated argument and never saved; checkpoints
    record its source and fingerprint, and a resume with another teacher is refused.
    Logged steps add the student's held-out perplexity (`distill.eval_path`) and the
    teacher's, computed once.

    teacher: the handle of teacher.model_dir when the caller has opened it (by default
    opened here); teacher_config: the teacher's architecture from teacher.preset when
    only shapes are needed (ahead-of-time compilation). model_dir: the handle of
    model.model_dir (the student to start from, or a LoRA student's base), likewise.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: formats.ModelDir | None = None,
        teacher_config: LlamaConfig | None = None,
        model_dir: formats.ModelDir | None = None,
    ):
        super().__init__(cfg)
        if cfg.teacher is None or cfg.distill is None:
            raise ConfigError("distillation needs a config with teacher and distill sections")
        if teacher is None and teacher_config is None:
            if not cfg.teacher.model_dir:
                raise ConfigError("teacher.model_dir is empty; give the teacher's model directory")
            if not epath.Path(cfg.teacher.model_dir).exists():
                raise ConfigError(f"teacher.model_dir={cfg.teacher.model_dir} does not exist")
            teacher = formats.ModelDir.open(cfg.teacher.model_dir)
            if cfg.structured is not None:
                formats.check_source(teacher)
                formats.calibration_source(cfg.structured, cfg.data)
        self.teacher = teacher
        teacher_config = teacher_config or teacher.config
        self.model_dir = model_dir or train.open_model_dir(cfg.model)
        if cfg.distill.eval_path and not epath.Path(cfg.distill.eval_path).exists():
            raise ConfigError(f"distill.eval_path={cfg.distill.eval_path} does not exist")
        self.teacher_config = teacher_config
        self.model_config = student_model_config(cfg, teacher_config, teacher, self.model_dir)
        check_pair(cfg, self.model_config, teacher_config)
        self.features = feature_match(cfg, self.model_config, teacher_config)
        self.on_policy = cfg.distill.on_policy
        self.cache = None
        if cfg.teacher.logits_dir:
            self.cache = open_cache(cfg, self.model_config, teacher_config)

    def build(self, p: train.Plan) -> train.Step:
        cfg = self.cfg
        frozen = {}
        if cfg.lora is None:
            self.make_model, self.graphdef, abstract = train.abstract_model(
                p.model_config, cfg.model, p.mesh, p.rules, cfg.train.seed
            )
            student = abstract
        else:
            self.make_model, self.graphdef, abstract, frozen["base"] = train.abstract_lora(
                cfg, p, self.model_dir
            )
            self.abstract_adapters = abstract
            student = compress.combine(frozen["base"], abstract)
        self.teacher_graphdef, abstract_teacher_params = abstract_teacher(
            cfg, self.teacher_config, self.teacher, p.mesh, p.rules
        )
        extra_batch = {}
        if self.cache is None:
            frozen["teacher"] = abstract_teacher_params
        else:
            shape = (*p.batch_shape, self.cache.layout.record_bytes)
            extra_batch[logit_cache.RECORDS] = jax.ShapeDtypeStruct(
                shape, jnp.uint8, sharding=logit_cache.records_sharding(p.batch_sh)
            )
        self.abstract_frozen = frozen
        if self.features is not None and self.features.projected:
            abstract = abstract | {PROJECTION: {"kernel": self._abstract_projection(p)}}
        tx = train.build_optimizer(p.opt_cfg, cfg.prune, abstract)
        total, d = cfg.train.steps, cfg.distill
        step_fn = make_distill_step(
            self.graphdef,
            self.teacher_graphdef,
            tx,
            train.learning_rate_schedule(p.opt_cfg),
            d.loss,
            alpha_fn=linear_schedule(d.loss.alpha, d.alpha_end, total),
            temperature_fn=linear_schedule(d.loss.temperature, d.temperature_end, total),
            grad_accum=cfg.train.grad_accum,
            loss_chunk=cfg.train.loss_chunk,
            features=self.features,
            cached=None if self.cache is None else self.cache.layout,
            teacher_nll=self.on_policy is not None,
        )
        if self.on_policy is not None:
            config = self.model_config
            self.sampler = on_policy.make_sampler(
                self.graphdef,
                self.on_policy,
                seq_len=cfg.data.seq_len,
                eos_ids=config.eos_token_ids,
                pad_id=config.pad_token_id if config.pad_token_id is not None else 0,
                param_shardings=jax.tree.map(lambda x: x.sharding, student),
                batch_sh=p.batch_sh,
                from_file=bool(self.on_policy.prompts),
            )
        name = " and ".join(
            n for n, k in (("teacher", "teacher"), ("frozen base", "base")) if k in frozen
        )
        return train.jit_step(
            step_fn, tx, p, abstract, frozen or None, name, extra_batch=extra_batch
        )

    def _abstract_projection(self, p: train.Plan) -> jax.ShapeDtypeStruct:
        shape = (
            len(self.features.student_layers),
            self.model_config.embed_dim,
            self.teacher_config.embed_dim,
        )
        spec = sharding.logical_to_spec((None, "embed", None), shape, p.mesh, p.rules)
        dtype = jnp.dtype(self.cfg.model.param_dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(p.mesh, spec))

    def check(self, setup: train.Setup) -> None:
        cfg = self.cfg
        if cfg.lora is not None and not cfg.model.model_dir:
            raise ConfigError(
                f"lora.rank={cfg.lora.rank} needs model.model_dir: the frozen student base "
                "the adapters are trained on"
            )
        check_store_tokenizer(self.cfg, self.teacher, setup.iterator)
        if self.cache is not None:
            setup.iterator = logit_cache.CachedBatches(setup.iterator, self.cache, cfg.train.steps)
        self.prompt_file = None
        if self.on_policy is not None and self.on_policy.prompts:
            self.prompt_file = on_policy.PromptFile(
                self.on_policy.prompts,
                self.on_policy.prompt_field,
                setup.tokenizer,
                prompt_len=cfg.data.seq_len - self.on_policy.max_new_tokens,
                batch_sh=setup.batch_sh,
                global_batch=cfg.data.global_batch,
            )

    def load(self, setup: train.Setup, saved: Mapping[str, Any] | None):
        cfg = self.cfg
        self.generation = {
            "seconds": 0.0,
            "tokens": 0.0,
            "lengths": [],
            "since": time.perf_counter(),
        }
        self.policy_tally = None  # [steps prepared so far, how many of them sampled]
        self.eval_batches = []
        if cfg.distill.eval_path:
            eval_cfg = dataclasses.replace(cfg.data, path=cfg.distill.eval_path)
            iterator = data.DataIterator(
                eval_cfg, setup.tokenizer, setup.batch_sh, vocab_size=self.model_config.vocab_size
            )
            self.eval_batches = [next(iterator) for _ in range(cfg.distill.eval_batches)]
        self.base = None
        if cfg.lora is not None:
            self.lora_meta = compress.to_meta(cfg.lora)
            self.base = train.load_lora_base(
                self.model_dir, self.abstract_frozen["base"], self.lora_meta, saved
            )
        self.teacher_params = None
        if self.cache is None:
            train.log_info("loading the teacher from %s", self.teacher)
            self.teacher_params = self.teacher.load_params(self.abstract_frozen["teacher"])
            fingerprint = self.teacher.fingerprint(self.teacher_params)
        else:
            fingerprint = self.cache.meta["teacher"]["fingerprint"]
        self.teacher_meta = {"source": str(cfg.teacher.model_dir), "fingerprint": fingerprint}
        if self.cache is not None:
            self.teacher_meta["logits_dir"] = str(self.cache.directory)
        if saved is not None:
            check_same_teacher(saved["teacher"], self.teacher_meta, cfg.teacher.model_dir)
        self.student_eval = make_eval_step(self.graphdef, cfg.train.loss_chunk)
        self.teacher_ppl = None
        frozen = {} if self.cache is not None else {"teacher": self.teacher_params}
        frozen |= {} if self.base is None else {"base": self.base}
        return frozen or None

    def _student(self, params):
        """The student's full parameters from the trained ones (no projection; a LoRA
        student's adapters combined with its base)."""
        params = {k: v for k, v in params.items() if k != PROJECTION}
        return params if self.base is None else compress.combine(self.base, params)

    def initial_params(self, setup: train.Setup):
        """The student (random, a model directory, or a subset of the teacher's layers)
        and, with a feature projection, the projection."""
        params = self._initial_student(setup)
        if self.features is None or not self.features.projected:
            return params
        abstract = self._abstract_projection(setup)
        m, d_in, d_out = abstract.shape

        def init():
            # Equal widths start from the identity; otherwise a random projection that
            # keeps the scale of its input.
            if d_in == d_out:
                return jnp.broadcast_to(jnp.eye(d_in, dtype=abstract.dtype), abstract.shape)
            key = jax.random.key(self.cfg.train.seed)
            return jax.random.normal(key, abstract.shape, abstract.dtype) / np.sqrt(d_in)

        kernel = jax.jit(init, out_shardings=abstract.sharding)()
        return params | {PROJECTION: {"kernel": kernel}}

    def _initial_student(self, setup: train.Setup):
        cfg = self.cfg
        if cfg.lora is not None:
            return compress.init_adapters(self.make_model, self.abstract_adapters)
        if cfg.structured is not None:
            _, abstract = nn.abstract_params(
                self.model_config, setup.mesh, setup.rules, **cfg.model.kwargs()
            )
            return formats.load_or_prune(
                epath.Path(setup.workdir) / "pruned_student",
                cfg.structured,
                self.teacher_config,
                self.teacher_params,
                abstract,
                tokenizer=setup.tokenizer,
                mesh=setup.mesh,
                rules=setup.rules,
                run_data=cfg.data,
                dtype=jnp.dtype(cfg.teacher.dtype),
                teacher_source=str(cfg.teacher.model_dir),
                files=self.teacher.tokenizer_files() or None,
            )
        if not cfg.model.teacher_layers:
            return train.initial_params(
                self.model_dir, cfg.model, self.make_model, setup.mesh, setup.rules
            )
        teacher_layers = len_layers(self.teacher_params)
        layers = jnp.asarray(parse_layer_map(cfg.model.teacher_layers, teacher_layers))
        _, abstract = nnx.split(nnx.eval_shape(self.make_model))
        target_sh = nnx.to_pure_dict(sharding.state_shardings(abstract, setup.mesh, setup.rules))
        dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(abstract))

        def pick(params):
            out = dict(params)
            out["layers"] = jax.tree.map(lambda x: jnp.take(x, layers, axis=0), params["layers"])
            return jax.tree.map(lambda x, dt: x.astype(dt), out, dtypes)

        return jax.jit(pick, out_shardings=target_sh)(self.teacher_params)

    def prepare(self, step: int, state: train.TrainState, batch):
        """On a sampling step (`on_policy.is_on_policy`), the student's continuations of
        this step's prompts; otherwise the batch as read."""
        spec = self.on_policy
        if spec is None:
            return batch
        seed = self.cfg.train.seed
        if self.policy_tally is None:  # the steps before a resume, counted once
            self.policy_tally = [step, on_policy.sampling_steps(seed, step, spec.lmbda)]
        sample = on_policy.is_on_policy(seed, step, spec.lmbda)
        self.policy_tally = [step + 1, self.policy_tally[1] + sample]
        if not sample:
            return batch
        start = time.perf_counter()
        student = self._student(state.params)
        source = batch if self.prompt_file is None else self.prompt_file.batch(step)
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)
        out, mean_length = self.sampler(student, source, key)
        # Waiting here times generation apart from training (the step needs it anyway).
        mean_length = float(mean_length)
        self.generation["seconds"] += time.perf_counter() - start
        self.generation["tokens"] += mean_length * self.cfg.data.global_batch
        self.generation["lengths"].append(mean_length)
        return out

    def meta(self) -> dict[str, Any]:
        out = {"teacher": self.teacher_meta}
        if self.base is not None:
            out["lora"] = self.lora_meta
        if self.cfg.structured is not None:
            out["structured"] = dataclasses.asdict(self.cfg.structured)
        return out

    def check_resumable(self, saved: Mapping[str, Any]) -> None:
        if "teacher" not in saved:
            raise ConfigError(
                "the workdir holds a run that was not distillation (its config has no "
                "teacher); use a new workdir for the student"
            )
        train.check_resumable(saved, self.cfg)
        before = saved.get("structured")
        if compress.parse_structured(before) != self.cfg.structured:
            raise ConfigError(
                f"the checkpoint was written with structured settings {before}, not "
                f"{self.cfg.raw.get('structured')}; resume with the same block or use a new "
                "workdir"
            )

    def inputs(self) -> list[str]:
        return [*super().inputs(), self.cfg.teacher.model_dir, self.cfg.teacher.logits_dir]

    def flops_per_token(self) -> float:
        seq = self.cfg.data.seq_len
        # The teacher runs forward only: a third of its training FLOPs.
        teacher = train.matmul_flops_per_token(self.teacher_config, seq) / 3
        if self.cache is not None:
            teacher = 0.0
        frozen = self.cfg.lora is not None
        return train.matmul_flops_per_token(self.model_config, seq, frozen=frozen) + teacher

    def on_log(self, step: int, state: train.TrainState) -> dict[str, float]:
        out = train.prune_metrics(state.opt_state) | self._sampling_metrics(step)
        every = self.cfg.distill.eval_every
        if not self.eval_batches:
            return out
        if not (step == self.cfg.train.steps or (every and step % every == 0)):
            return out
        out["eval_ppl"] = heldout_perplexity(
            self.student_eval, self._student(state.params), self.eval_batches
        )
        if self.teacher_ppl is None and self.teacher_params is not None:
            teacher_eval = make_eval_step(self.teacher_graphdef, self.cfg.train.loss_chunk)
            self.teacher_ppl = heldout_perplexity(
                teacher_eval, self.teacher_params, self.eval_batches
            )
        return out if self.teacher_ppl is None else out | {"teacher_eval_ppl": self.teacher_ppl}

    def _sampling_metrics(self, step: int) -> dict[str, float]:
        """Since the last log: the steps that sampled (over the whole run), the mean
        sampled length, and tokens/s of generation and of the rest of the steps."""
        if self.on_policy is None:
            return {}
        s, now = self.generation, time.perf_counter()
        train_s = max(now - s["since"] - s["seconds"], 1e-9)
        steps, sampled = self.policy_tally or (0, 0)
        out = {"onpolicy_fraction": sampled / steps if steps else 0.0}
        if s["lengths"]:
            out["completion_len"] = float(np.mean(s["lengths"]))
            out["gen_tokens_per_s"] = s["tokens"] / max(s["seconds"], 1e-9)
        out["gen_s"] = s["seconds"]
        out["train_s"] = train_s
        self.generation = {"seconds": 0.0, "tokens": 0.0, "lengths": [], "since": now}
        return out


def open_cache(cfg: DistillConfig, student_config: LlamaConfig, teacher_config: LlamaConfig):
    """The teacher's logit cache of `teacher.logits_dir`, refused unless it was written
    for this run's data settings, vocabulary and teacher (its architecture and
    directory: the weights are not read to compare them) with k >= distill.top_k."""
    cache = logit_cache.LogitCache(cfg.teacher.logits_dir)
    diffs = cache.mismatches(
        cfg.data, vocab_size=student_config.vocab_size, teacher_config=teacher_config
    )
    written_from = cache.meta["teacher"].get("source", "")
    if (
        cfg.teacher.model_dir
        and written_from
        and (logit_cache.norm_path(written_from) != logit_cache.norm_path(cfg.teacher.model_dir))
    ):
        diffs.append(f"teacher: cache {written_from!r}, run {cfg.teacher.model_dir!r}")
    if cfg.distill.loss.top_k > cache.layout.top_k:
        diffs.append(f"distill.top_k={cfg.distill.loss.top_k}, cache k={cache.layout.top_k}")
    if diffs:
        raise ConfigError(
            f"{cache.directory} was written for another run: {'; '.join(diffs)}; write a "
            "cache for this one (python -m launch.teacher_logits) or match its settings"
        )
    return cache


def check_store_tokenizer(cfg, teacher: formats.ModelDir | None, iterator) -> None:
    """Token stores read without data.tokenizer are checked against the teacher's own
    tokenizer: a store made with another one would distil the teacher's predictions for other
    text."""
    stores = iterator.store_digests()
    if cfg.tokenizer or not stores or teacher is None or teacher.tokenizer_path is None:
        return
    tokenizer = formats.load_tokenizer(teacher)
    for path in stores:
        try:
            data.TokenStore(path).check(seq_len=cfg.data.seq_len, tokenizer_path=tokenizer.path)
        except DataError as e:
            raise DataError(
                f"{e} (the teacher's tokenizer). If the store was made with an equivalent "
                "tokenizer file, set data.tokenizer to that file"
            ) from None


def recipe_for(cfg) -> train.Recipe:
    """The recipe a config asks for (typed or not): `Distillation` when it has
    distillation sections, else `train.recipe_for` (full training or LoRA)."""
    cfg = typed_config(cfg)
    return Distillation(cfg) if isinstance(cfg, DistillConfig) else train.recipe_for(cfg)


def run(cfg, workdir) -> dict[str, float]:
    """Runs any config (configs/base.py layout, a ConfigDict or a typed config) in
    `workdir`, resuming from its latest complete checkpoint: `train.run` with the recipe
    the config asks for (`recipe_for`). Returns the last logged metrics.

    Config, model directories, vocabularies, mesh, batch split, tokenizer and data are
    all checked before anything is compiled or initialised.
    """
    cfg = typed_config(cfg)
    return train.run(cfg, workdir, recipe_for(cfg))


def len_layers(params) -> int:
    return jax.tree.leaves(params["layers"])[0].shape[0]
