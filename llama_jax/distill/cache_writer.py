"""Writing a teacher logit cache (`logit_cache`): the teacher runs once over a
distillation config's data, in the order the distillation run reads it.

The teacher's forward pass runs jitted on the run's mesh and sharding rules (the
teacher sharded as a distillation run holds it) over each global batch; the top k of
its float32 logits and the tail's log-mass are packed into records on the devices, one
chunk of positions at a time. Each process then writes only its own part of the rows,
`steps_per_shard` steps to a shard, each shard under a temporary name renamed when
complete. Rerunning the same command resumes: shards already whole are kept, the
others are computed again (every process computes the steps any process lacks, as the
teacher's forward pass is one program over all devices). A larger --steps extends a
cache; anything else that differs from the cache in the directory is refused before
any work, naming it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from llama_jax import formats, paths, sharding, train
from llama_jax.distill import cache as logit_cache
from llama_jax.distill import recipe
from llama_jax.distill import records as logit_records
from llama_jax.distill.records import Layout
from llama_jax.distill.spec import DistillConfig
from llama_jax.errors import ConfigError
from llama_jax.train import matmul_flops_per_token

# Default shard size: large enough that a pod writes few files, small enough that a
# killed run loses little and a host holds it in memory.
SHARD_TARGET_BYTES = 256 << 20
# Default positions per chunk: one device's float32 [b, C, V] logits near this size.
CHUNK_TARGET_BYTES = 256 << 20


def records_fn(graphdef, layout: Layout, *, chunk: int, micro: int):
    """Returns f(teacher params, tokens int32[B, T], segment_ids int32[B, T]) -> uint8
    [B, T, R], the teacher's records (`logit_records.encode`), not yet jitted.

    The logits are made `chunk` positions at a time, so at most a [B, chunk, V] float32
    block exists; `micro` > 1 runs the batch as that many microbatches of B / micro rows
    (rows m, m + micro, ...: each microbatch stays spread over the batch shards), as a
    distillation step with that gradient accumulation runs its teacher.
    """

    def rows(params, tokens_BT, segment_ids_BT):
        teacher = nnx.merge(graphdef, params)
        h_BTD, _ = teacher.hidden_states(tokens_BT, segment_ids_BT=segment_ids_BT)
        b, t, d = h_BTD.shape
        pad = -t % chunk
        h = jnp.pad(h_BTD, [(0, 0), (0, pad), (0, 0)]).reshape(b, -1, chunk, d)

        def one(h_BCD):
            logits_BCV = teacher.unembed(h_BCD, out_dtype=jnp.float32)
            logits_BCV = sharding.constrain(logits_BCV, ("batch", "length", "vocab"))
            return logit_records.encode(
                layout, *logit_records.top_k_distribution(logits_BCV, layout.top_k)
            )

        out = jax.lax.map(one, jnp.moveaxis(h, 1, 0))
        return jnp.moveaxis(out, 0, 1).reshape(b, t + pad, -1)[:, :t]

    def teacher_records(params, tokens_BT, segment_ids_BT):
        if micro == 1:
            return rows(params, tokens_BT, segment_ids_BT)
        b, t = tokens_BT.shape

        def split(x):
            return jnp.swapaxes(x.reshape(b // micro, micro, t), 0, 1)

        out = jax.lax.map(lambda xs: rows(params, *xs), (split(tokens_BT), split(segment_ids_BT)))
        return jnp.swapaxes(out, 0, 1).reshape(b, t, -1)

    return teacher_records


def default_chunk(seq_len: int, vocab_size: int, rows_per_device: int) -> int:
    """Positions per chunk: the largest power of two up to T whose float32 [b, C, V]
    logits on one device stay near CHUNK_TARGET_BYTES."""
    fit = CHUNK_TARGET_BYTES // (4 * vocab_size * max(rows_per_device, 1))
    return min(seq_len, 2 ** max(int(math.log2(max(fit, 1))), 0))


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a cache's metadata and this run's, as readable lines."""
    pairs = [(f"layout.{k}", saved["layout"].get(k), v) for k, v in now["layout"].items()]
    pairs += [(f"data.{k}", saved["data"].get(k), v) for k, v in now["data"].items()]
    pairs += [
        ("steps_per_shard", saved.get("steps_per_shard"), now["steps_per_shard"]),
        ("teacher.dtype", saved["teacher"].get("dtype"), now["teacher"]["dtype"]),
    ]
    out = [f"{name}: cache {was!r}, now {is_!r}" for name, was, is_ in pairs if was != is_]
    if saved.get("parts") != now["parts"]:
        out.append(
            f"rows per process: cache {saved.get('parts')}, now {now['parts']} (another mesh "
            "or number of processes)"
        )
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_shard(path: epath.Path, crc: np.ndarray, records: np.ndarray) -> None:
    """Writes one shard: crc uint32[s, b], records uint8[s, b, T, R]; under a temporary
    name, renamed when complete."""
    dtype = logit_cache.shard_dtype(records.shape[2], records.shape[3])
    array = np.empty(crc.shape, dtype)
    array["tokens_crc32"] = crc
    array["records_crc32"] = logit_cache.records_crc32(records)
    array["records"] = records
    tmp = path.parent / f"{path.name}.tmp"
    with tmp.open("wb") as f:
        f.write(logit_cache.shard_header(crc.shape, dtype))
        f.write(array.tobytes())
    tmp.replace(path)


def _check_args(cfg: DistillConfig, **values) -> None:
    if not cfg.teacher.model_dir:
        raise ConfigError("teacher.model_dir is empty; give the teacher's model directory")
    if not epath.Path(cfg.teacher.model_dir).exists():
        raise ConfigError(f"teacher.model_dir={cfg.teacher.model_dir} does not exist")
    lows = {"steps": 1, "steps_per_shard": 0, "chunk": 0, "log_every": 1}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < lows[name]:
            raise ConfigError(f"{name}={value!r}; expected an integer >= {lows[name]}")


def _check_tokenizers(cfg: DistillConfig, teacher: formats.ModelDir) -> None:
    """Refuses data tokenized for another vocabulary than the teacher's tokenizer."""
    if not (cfg.tokenizer and teacher.tokenizer_path):
        return
    data_vocab = formats.load_tokenizer(cfg.tokenizer).vocab_size
    teacher_vocab = teacher.tokenizer().vocab_size
    if data_vocab != teacher_vocab:
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer} has {data_vocab} tokens but the teacher's "
            f"tokenizer ({teacher.tokenizer_path}) has {teacher_vocab}: the cache would "
            "hold the teacher's view of other text; tokenize the data with the teacher's "
            "tokenizer"
        )


def _metadata(cfg: DistillConfig, layout: Layout, steps, steps_per_shard, parts, saved, out_dir):
    """This run's cache metadata (the teacher's fingerprint still to come), after
    refusing a `saved` cache it does not match."""
    if not steps_per_shard:
        if saved is not None:
            steps_per_shard = saved["steps_per_shard"]
        else:
            part_step = max(map(len, parts)) * cfg.data.seq_len * (layout.record_bytes + 1)
            steps_per_shard = max(1, SHARD_TARGET_BYTES // part_step)
    meta = {
        "format": logit_cache.FORMAT,
        "version": logit_cache.FORMAT_VERSION,
        "layout": layout.to_json(),
        "steps": steps,
        "steps_per_shard": steps_per_shard,
        "parts": parts,
        "data": logit_cache.data_settings(cfg.data),
        "teacher": {"source": str(cfg.teacher.model_dir), "dtype": cfg.teacher.dtype},
    }
    if saved is not None:
        diffs = _differences(saved, meta)
        if diffs:
            raise ConfigError(
                f"{out_dir} holds a teacher logit cache written with other settings ("
                + "; ".join(diffs)
                + "); use those settings (the same mesh and processes too) or a new out_dir"
            )
        meta["steps"] = max(steps, saved["steps"])
    return meta


def _steps_to_compute(cache: logit_cache.LogitCache, mine: list[int]) -> tuple[list[int], set]:
    """(the steps some process lacks a whole shard of, the first steps of the shards this
    process must write). The teacher's forward pass is one program over every device,
    so all processes compute the steps any of them lacks."""
    firsts = list(range(0, cache.steps, cache.steps_per_shard))
    me = jax.process_index()
    bad = np.array([bool(mine) and cache.shard_problem(f, me) is not None for f in firsts])
    todo = bad
    if jax.process_count() > 1:
        todo = multihost_utils.process_allgather(bad).any(axis=0)
    steps = [
        s
        for first, needed in zip(firsts, todo, strict=True)
        if needed
        for s in range(first, min(first + cache.steps_per_shard, cache.steps))
    ]
    return steps, {f for f, b in zip(firsts, bad, strict=True) if b}


class _Shards:
    """Collects this process's rows step by step and writes each shard it owes once
    its last step is in."""

    def __init__(self, cache: logit_cache.LogitCache, mine: list[int], owed: set, local):
        self.cache, self.mine, self.owed = cache, mine, owed
        # Where this process's rows sit among the rows `DataIterator.local_batch` gives.
        self.pick = np.searchsorted(local, mine)
        self.open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, step: int, records: jax.Array, tokens_bT: np.ndarray) -> None:
        first = step - step % self.cache.steps_per_shard
        if first not in self.owed:
            # Computed for another process's missing shard; this one's is whole.
            return
        n, b = self.cache.shard_shape(first, jax.process_index())
        if first not in self.open:
            self.open[first] = (
                np.empty((n, b), np.uint32),
                np.empty((n, b, *records.shape[1:]), np.uint8),
            )
        crc, recs = self.open[first]
        crc[step - first] = logit_cache.tokens_crc32(tokens_bT[self.pick])
        recs[step - first] = _own_rows(records, self.mine)
        if step == first + n - 1:
            crc, recs = self.open.pop(first)
            write_shard(self.cache.shard_path(first, jax.process_index()), crc, recs)


def write_teacher_logits(
    cfg,
    out_dir,
    *,
    top_k: int,
    steps: int | None = None,
    steps_per_shard: int = 0,
    chunk: int = 0,
    log_every: int = 10,
) -> dict[str, Any]:
    """Writes (or completes, or extends) the teacher logit cache of a distillation
    config in `out_dir`, a directory every process can reach. All processes call it
    with the same arguments.

    cfg: a distillation config (configs/base.py `distill_config` layout; a ConfigDict or
      a DistillConfig): its teacher, data, mesh and train.grad_accum are used.
    top_k: tokens kept per position. steps: global batches to cache (default
      train.steps). steps_per_shard: 0 picks about SHARD_TARGET_BYTES per shard; a
      cache keeps the value it was started with. chunk: positions per logits block (0:
      `default_chunk`). log_every: steps between progress lines.

    Returns {"steps", "computed_steps", "record_bytes", "bytes_per_token" (this
    process's shards on disk over their tokens), "tokens_per_s" (teacher tokens per
    second over all devices, compilation excluded; None below two computed steps)}.
    """
    cfg = DistillConfig.of(cfg)
    steps = cfg.train.steps if steps is None else steps
    _check_args(cfg, steps=steps, steps_per_shard=steps_per_shard, chunk=chunk, log_every=log_every)
    inputs = [cfg.teacher.model_dir, cfg.data.path, cfg.tokenizer]
    inputs += [path for path, _ in cfg.data.sources]
    paths.check_apart(out_dir, inputs, flag="--out_dir")
    out_dir = epath.Path(logit_cache.norm_path(str(out_dir)))
    paths.check_output_dir(out_dir, flag="--out_dir")
    teacher = formats.ModelDir.open(cfg.teacher.model_dir)
    teacher_config = teacher.config
    # The student the cache is for must be able to distil from this teacher.
    student_config = recipe.student_model_config(
        cfg, teacher_config, teacher, train.open_model_dir(cfg.model)
    )
    recipe.check_pair(cfg, student_config, teacher_config)
    _check_tokenizers(cfg, teacher)
    layout = Layout(top_k, teacher_config.vocab_size)
    # Every process looks before process 0 writes anything.
    _sync("llama_jax.logit_cache.start")
    saved = None
    if out_dir.exists() and any(out_dir.iterdir()):
        saved = logit_cache.read_metadata(out_dir)

    setup = train.setup(cfg, teacher_config)
    recipe.check_store_tokenizer(cfg, teacher, setup.iterator)
    b, t = cfg.data.global_batch, cfg.data.seq_len
    out_sh = logit_cache.records_sharding(setup.batch_sh, whole_rows=True)
    parts = logit_cache.row_parts(out_sh, (b, t, layout.record_bytes))
    meta = _metadata(cfg, layout, steps, steps_per_shard, parts, saved, out_dir)
    micro = cfg.train.grad_accum
    rows_per_device = b // micro // sharding.axis_size(setup.mesh, setup.rules, "batch")
    chunk = chunk or default_chunk(t, layout.vocab_size, rows_per_device)

    graphdef, params, meta["teacher"]["fingerprint"] = recipe.load_teacher(
        cfg, teacher, setup.mesh, setup.rules
    )
    if saved is not None:
        why = formats.fingerprint_mismatch(
            saved["teacher"]["fingerprint"], meta["teacher"]["fingerprint"]
        )
        if why is not None:
            raise ConfigError(
                f"{out_dir} holds the logits of a teacher with {why} than "
                f"{cfg.teacher.model_dir}; use that teacher or a new out_dir"
            )
    if jax.process_index() == 0:
        (out_dir / logit_cache.SHARDS).mkdir(parents=True, exist_ok=True)
        logit_cache.write_json(out_dir / logit_cache.METADATA, meta)
    _sync("llama_jax.logit_cache.metadata")
    cache = logit_cache.LogitCache(out_dir)
    mine = parts[jax.process_index()]
    todo, owed = _steps_to_compute(cache, mine)
    shards = _Shards(cache, mine, owed, logit_cache.local_rows(setup.iterator.sharding, (b, t)))

    fn = jax.jit(
        records_fn(graphdef, layout, chunk=chunk, micro=micro),
        in_shardings=(jax.tree.map(lambda x: x.sharding, params), setup.batch_sh, setup.batch_sh),
        out_shardings=out_sh,
    )
    flops = matmul_flops_per_token(teacher_config, t) / 3
    throughput, pending, logged, timed_from = None, None, 1, time.perf_counter()
    with sharding.activation_sharding(setup.mesh, setup.rules):
        for i, step in enumerate(todo, 1):
            local = setup.iterator.local_batch(step)
            tokens, segment_ids = (
                jax.make_array_from_process_local_data(setup.iterator.sharding, local[k], (b, t))
                for k in ("tokens", "segment_ids")
            )
            out = fn(params, tokens, segment_ids)
            # The host files the previous step while the devices run this one.
            if pending is not None:
                shards.add(*pending)
            pending = (step, out, local["tokens"])
            if i == 1:
                jax.block_until_ready(out)
                throughput = train.Throughput(flops, total_steps=len(todo), start_step=1)
                timed_from = time.perf_counter()
            elif i % log_every == 0 or i == len(todo):
                jax.block_until_ready(out)
                rates = throughput.update(i, b * t * (i - logged))
                logged = i
                train.log_info("teacher logits: %s", train.progress_line(i, len(todo), rates))
        if pending is not None:
            shards.add(*pending)
    _sync("llama_jax.logit_cache.done")
    elapsed = time.perf_counter() - timed_from
    me = jax.process_index()
    own = [cache.shard_path(f, me) for f in range(0, cache.steps, cache.steps_per_shard)]
    disk = sum(p.stat().length for p in own) if mine else 0
    summary = {
        "steps": cache.steps,
        "computed_steps": len(todo),
        "record_bytes": layout.record_bytes,
        "bytes_per_token": disk / (cache.steps * len(mine) * t) if mine else None,
        "tokens_per_s": b * t * (len(todo) - 1) / elapsed if len(todo) > 1 else None,
    }
    train.log_info(
        "teacher logits: %d steps in %s (%d computed), %d bytes/token",
        cache.steps,
        out_dir,
        len(todo),
        round(summary["bytes_per_token"] or layout.record_bytes),
    )
    return summary


def _own_rows(records: jax.Array, rows: list[int]) -> np.ndarray:
    """This process's `rows` of global uint8[B, T, R] records, from its devices' shards."""
    found: dict[int, np.ndarray] = {}
    for shard in records.addressable_shards:
        start = shard.index[0].start or 0
        needed = [r for r in range(start, start + shard.data.shape[0]) if r not in found]
        if needed:
            host = np.asarray(shard.data)
            for r in needed:
                found[r] = host[r - start]
    if not rows:
        return np.empty((0, *records.shape[1:]), np.uint8)
    return np.stack([found[r] for r in rows])
