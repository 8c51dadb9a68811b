"""The teacher logit cache: its records, the writer (data order, resume, processes), the
reader beside the data iterator, and the sparse distillation loss."""

import dataclasses
import filecmp
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import processes
import pytest
from flax import nnx
from hf_models import make_hf_model

from configs import distill_tiny
from llama_jax.distill import (
    cache as logit_cache,
)
from llama_jax.distill import (
    cache_writer as logit_cache_writer,
)
from llama_jax.distill import (
    records as logit_records,
)
from llama_jax.distill.records import Layout
from llama_jax.distill.spec import DistillConfig
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.formats import ModelDir, model_dir, runs
from llama_jax.formats.fingerprint import fingerprint_mismatch
from llama_jax.nn.losses import DistillLossConfig, chunked_distill_loss, chunked_sparse_distill_loss
from llama_jax.train import loop as train

REPO = Path(__file__).parents[1]
TOP_K = 8
STEPS = 4
# The error bound on a stored log-probability the format promises.
BOUND = 1e-2
# Jitted once per layout: op-by-op, the many small bit operations each compile.
encode = jax.jit(logit_records.encode, static_argnums=0)
decode = jax.jit(logit_records.decode, static_argnums=0)
top_k_distribution = jax.jit(logit_records.top_k_distribution, static_argnums=1)


# ---- records -----------------------------------------------------------------------------------


def test_record_size_at_k64_and_a_llama3_vocabulary():
    layout = Layout(64, 128256)
    assert layout.id_bits == 17
    assert layout.record_bytes == 234 <= 300
    assert Layout(8, 263).id_bits == 9 and Layout(8, 256).id_bits == 8


def test_records_round_trip_within_the_bound():
    layout = Layout(64, 128256)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(128256)[:64] for _ in range(6)]).reshape(2, 3, 64)
    logp = -np.sort(rng.exponential(6.0, (2, 3, 64)), axis=-1).astype(np.float32)
    logp[0, 0, 0] = 3e-7  # rounding can leave the top token a hair above 0
    logp[1, 2, 50:] = -40.0  # below the lowest code (about -32 nats)
    tail = np.log(rng.uniform(1e-9, 0.5, (2, 3))).astype(np.float32)
    tail[0, 1] = -np.inf
    records = encode(layout, ids, logp, tail)
    assert records.shape == (2, 3, 234) and records.dtype == jnp.uint8
    got_ids, got_logp, got_tail = map(np.asarray, decode(layout, records))
    np.testing.assert_array_equal(got_ids, ids)
    kept = logp >= layout.lowest
    err = np.abs(got_logp[kept] - np.minimum(logp[kept], 0))
    assert err.max() <= layout.logprob_step / 2 + 1e-6 and err.max() < BOUND
    # Too small to store: not kept, and its mass moved to the tail.
    assert np.all(got_logp[~kept] == -np.inf)
    want_tail = np.logaddexp(tail[1, 2], np.logaddexp.reduce(logp[1, 2, 50:].astype(np.float64)))
    assert abs(got_tail[1, 2] - want_tail) < BOUND
    assert got_tail[0, 1] == -np.inf
    np.testing.assert_allclose(got_tail[0, 0], tail[0, 0], atol=layout.logprob_step / 2 + 1e-6)


def test_top_k_distribution_keeps_a_tiny_tail_exact():
    logits = np.zeros((1, 2, 50), np.float32)
    logits[0, 0] = np.linspace(-1, 0, 50)
    logits[0, 0, 7] = 30.0  # the other 49 tokens share about e**-27 of the mass
    logits[0, 1] = np.linspace(-3, 3, 50)
    ids, logp, tail = map(np.asarray, top_k_distribution(jnp.asarray(logits), 5))
    x = logits.astype(np.float64)
    log_p = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    order = np.argsort(-x, axis=-1)[..., :5]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(logp, np.take_along_axis(log_p, order, -1), atol=1e-5)
    rest = np.ones_like(x, bool)
    np.put_along_axis(rest, order, False, -1)
    want = np.logaddexp.reduce(np.where(rest, log_p, -np.inf), axis=-1)
    np.testing.assert_allclose(tail, want, rtol=1e-5)
    assert want[0, 0] < -25  # 1 - sum(p) would have been 0 in float32


def test_layout_refuses_bad_k():
    with pytest.raises(ConfigError, match=r"top_k=300; expected an integer in \[1, 263\]"):
        Layout(300, 263)
    with pytest.raises(ConfigError, match="top_k=0"):
        Layout(0, 263)


# ---- the writer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two random 3-layer teachers with the bundled tokenizer's vocabulary (263)."""
    root = tmp_path_factory.mktemp("teachers")
    for seed in (0, 1):
        make_hf_model(root / f"t{seed}", seed=seed, vocab_size=263, num_key_value_heads=1)
    return root / "t0", root / "t1"


def _cfg(teacher, **data):
    c = distill_tiny.get_config(str(teacher))
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = STEPS
    for k, v in data.items():
        c.data[k] = v
    return c


def _write(cfg, out, **kwargs):
    kwargs = dict(top_k=TOP_K, steps_per_shard=2) | kwargs
    return logit_cache_writer.write_teacher_logits(cfg, out, **kwargs)


@pytest.fixture(scope="module")
def cache_dir(teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "logits"
    summary = _write(_cfg(teachers[0]), out)
    assert summary["computed_steps"] == STEPS and summary["record_bytes"] == 23
    return out


def _all_records(directory, steps=STEPS):
    cache = logit_cache.LogitCache(directory)
    return np.stack([cache.read(s, range(cache.global_batch))[0] for s in range(steps)])


def test_cache_holds_the_teachers_top_k_of_each_batch_in_data_order(cache_dir, teachers):
    cfg = _cfg(teachers[0])
    cache = logit_cache.LogitCache(cache_dir)
    meta = json.loads((cache_dir / "metadata.json").read_text())
    assert meta["version"] == 2 and meta["layout"]["top_k"] == TOP_K
    assert meta["data"]["seed"] == 0 and meta["data"]["seq_len"] == 32
    assert meta["teacher"]["fingerprint"]["params"]
    assert cache.mismatches(DistillConfig.of(cfg).data, vocab_size=263) == []

    model, config = model_dir.load_model(teachers[0])
    forward = nnx.jit(lambda m, tokens, segment_ids: m(tokens, segment_ids_BT=segment_ids))
    iterator = train.setup(DistillConfig.of(cfg), config).iterator
    for step in range(STEPS):
        batch = iterator.local_batch(step)
        records, crc = cache.read(step, range(8))
        np.testing.assert_array_equal(crc, logit_cache.tokens_crc32(batch["tokens"]))
        ids, logp, tail = map(np.asarray, decode(cache.layout, records))
        logits = forward(model, batch["tokens"], batch["segment_ids"])
        x = np.asarray(logits, np.float64)
        log_p = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
        at_ids = np.take_along_axis(log_p, ids, -1)
        assert np.abs(logp - at_ids).max() < BOUND
        # The stored ids are a top k, most likely first.
        others = log_p.copy()
        np.put_along_axis(others, ids, -np.inf, -1)
        assert np.all(at_ids[..., -1] >= others.max(-1) - 1e-5)
        assert np.all(np.diff(at_ids, axis=-1) <= 1e-5)
        want_tail = np.logaddexp.reduce(others, axis=-1)
        assert np.abs(tail - want_tail).max() < BOUND


def test_killed_run_resumes_and_a_larger_steps_extends_bit_for_bit(cache_dir, teachers, tmp_path):
    cfg = _cfg(teachers[0])
    shards = sorted(os.listdir(cache_dir / "shards"))
    assert shards == ["s00000000.p0000.npy", "s00000002.p0000.npy"]

    # Killed while writing the second shard: the first is whole, a partial file is left.
    work = tmp_path / "killed"
    shutil.copytree(cache_dir, work)
    (work / "shards" / shards[1]).unlink()
    (work / "shards" / f"{shards[1]}.tmp").write_bytes(b"partial")
    assert _write(cfg, work)["computed_steps"] == 2
    for name in shards:
        assert filecmp.cmp(cache_dir / "shards" / name, work / "shards" / name, shallow=False)
    assert _write(cfg, work)["computed_steps"] == 0

    # A shard cut short is found and written again.
    damaged = work / "shards" / shards[0]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shards[0]} has .* bytes; expected"):
        logit_cache.LogitCache(work).check_shards(STEPS)
    assert _write(cfg, work)["computed_steps"] == 2
    assert filecmp.cmp(cache_dir / "shards" / shards[0], damaged, shallow=False)

    # Two steps, then two more.
    grown = tmp_path / "grown"
    _write(cfg, grown, steps=2)
    with pytest.raises(ConfigError, match="holds 2 steps; 4 are needed"):
        logit_cache.LogitCache(grown).check_shards(STEPS)
    assert _write(cfg, grown)["computed_steps"] == 2
    np.testing.assert_array_equal(_all_records(grown), _all_records(cache_dir))


def test_microbatches_chunks_and_tensor_parallelism_give_the_same_records(
    cache_dir, teachers, tmp_path
):
    cfg = _cfg(teachers[0])
    cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2
    cfg.train.grad_accum = 2
    _write(cfg, tmp_path / "c", steps=2, chunk=8)
    layout = Layout(TOP_K, 263)
    got = decode(layout, _all_records(tmp_path / "c", steps=2))
    want = decode(layout, _all_records(cache_dir, steps=2))
    np.testing.assert_array_equal(got[0], want[0])
    # Other float rounding may move a value to the neighbouring code.
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=layout.logprob_step + 1e-6)


def _tree_state(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "teacher, data, kwargs, message",
    [
        (0, dict(seed=1), {}, "data.seed: cache 0, now 1"),
        (0, {}, dict(top_k=5), "layout.top_k: cache 8, now 5"),
        (1, {}, {}, "a teacher with other weights"),
        (0, {}, dict(steps_per_shard=3), "steps_per_shard: cache 2, now 3"),
    ],
)
def test_a_cache_of_other_settings_is_refused_untouched(
    cache_dir, teachers, teacher, data, kwargs, message
):
    before = _tree_state(cache_dir)
    with pytest.raises(ConfigError, match=message):
        _write(_cfg(teachers[teacher], **data), cache_dir, **kwargs)
    assert _tree_state(cache_dir) == before


def test_bad_arguments_are_refused_before_any_work(teachers, tmp_path):
    with pytest.raises(ConfigError, match=r"top_k=264; expected an integer in \[1, 263\]"):
        _write(_cfg(teachers[0]), tmp_path / "a", top_k=264)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="has no metadata.json"):
        _write(_cfg(teachers[0]), other)
    assert os.listdir(other) == ["notes.txt"]
    with pytest.raises(ConfigError, match="teacher.model_dir=/nonexistent does not exist"):
        _write(_cfg("/nonexistent"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- reading beside the data iterator -----------------------------------------------------------


def test_cached_batches_on_another_mesh_resume_and_check_the_data(cache_dir, teachers):
    cfg = _cfg(teachers[0])
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    config = ModelDir.open(teachers[0]).config
    cache = logit_cache.LogitCache(cache_dir)
    full = _all_records(cache_dir)

    batches = logit_cache.CachedBatches(
        train.setup(DistillConfig.of(cfg), config).iterator, cache, STEPS
    )
    first = next(batches)
    records = first[logit_cache.RECORDS]
    assert records.shape == (8, 32, 23) and records.dtype == jnp.uint8
    assert records.sharding.spec[0] == train.setup(DistillConfig.of(cfg), config).batch_sh.spec[0]
    np.testing.assert_array_equal(np.asarray(records), full[0])
    state = batches.state()
    second = next(batches)
    batches.restore(state)
    again = next(batches)
    for name in (logit_cache.RECORDS, "tokens", "loss_mask"):
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(second[name]))
    np.testing.assert_array_equal(np.asarray(second[logit_cache.RECORDS]), full[1])

    with pytest.raises(ConfigError, match="holds 4 steps; 5 are needed"):
        logit_cache.CachedBatches(
            train.setup(DistillConfig.of(cfg), config).iterator, cache, STEPS + 1
        )
    other = _cfg(teachers[0], seed=3)
    assert cache.mismatches(DistillConfig.of(other).data) == ["data.seed: cache 0, run 3"]
    with pytest.raises(DataError, match="batch 0, row 0: its tokens are not the ones"):
        logit_cache.CachedBatches(
            train.setup(DistillConfig.of(other), config).iterator, cache, STEPS
        )


def test_missing_or_truncated_shards_are_named(cache_dir, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(cache_dir, work)
    shard = work / "shards" / "s00000002.p0000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"s00000002.p0000.npy is truncated \(step 3"):
        logit_cache.LogitCache(work).read(3, [7])
    shard.unlink()
    with pytest.raises(CheckpointError, match="s00000002.p0000.npy is missing; rerun"):
        logit_cache.LogitCache(work).check_shards(STEPS)
    logit_cache.LogitCache(work).check_shards(2)


def test_a_shard_with_flipped_bytes_is_a_checksum_mismatch(cache_dir, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(cache_dir, work)
    shard = work / "shards" / "s00000002.p0000.npy"
    cache = logit_cache.LogitCache(work)
    before, _ = cache.read(2, cache.parts[0])
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF  # inside the last row's records
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"s00000002.p0000.npy: checksum mismatch in step"):
        logit_cache.LogitCache(work).read(STEPS - 1, cache.parts[0])
    after, _ = logit_cache.LogitCache(work).read(2, cache.parts[0])
    np.testing.assert_array_equal(before, after)  # the other steps of the shard read fine


# ---- processes ---------------------------------------------------------------------------------


def test_two_processes_write_what_one_process_writes(cache_dir, teachers, tmp_path):
    port = processes.free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = tmp_path / "two"
    logs = processes.run_together(
        [
            [
                sys.executable,
                "-m",
                "launch.teacher_logits",
                "--config=configs/distill_tiny.py",
                f"--teacher={teachers[0]}",
                f"--out_dir={out}",
                f"--top_k={TOP_K}",
                "--steps_per_shard=2",
                "--config.data.seq_len=32",
                "--config.data.global_batch=8",
                f"--config.train.steps={STEPS}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            for i in range(2)
        ],
        env=env,
    )
    assert "tok/s" in logs[0] and "ETA" in logs[0]
    assert logit_cache.LogitCache(out).parts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sorted(os.listdir(out / "shards")) == [
        "s00000000.p0000.npy",
        "s00000000.p0001.npy",
        "s00000002.p0000.npy",
        "s00000002.p0001.npy",
    ]
    np.testing.assert_array_equal(_all_records(out), _all_records(cache_dir))


# ---- the sparse distillation loss -------------------------------------------------------------


def _loss_inputs(vocab=11, b=2, t=5, d=6, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w_student = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    w_teacher = jnp.asarray(rng.normal(size=(d, vocab)) * 2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    return h, w_student, w_teacher, targets, jnp.asarray(_mask(b, t))


def _mask(b, t):
    mask = np.ones((b, t), np.int32)
    mask[1, -2:] = 0
    return mask


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _sparse(h, w_student, teacher_logits, targets, mask, temperature, cfg, k):
    """The sparse loss against the top k of teacher logits; the temperature traced."""
    ids, logp, tail = logit_records.top_k_distribution(teacher_logits, k)
    return chunked_sparse_distill_loss(
        h,
        lambda x: x @ w_student,
        ids,
        logp,
        tail,
        targets,
        mask,
        cfg,
        chunk=2,
        temperature=temperature,
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dense(h, w_student, w_teacher, targets, mask, temperature, cfg):
    return chunked_distill_loss(
        h,
        lambda x: x @ w_student,
        h,
        lambda x: x @ w_teacher,
        targets,
        mask,
        cfg,
        chunk=2,
        temperature=temperature,
    )


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_loss_over_every_token_is_the_dense_loss(kind):
    h, ws, wt, targets, mask = _loss_inputs()
    cfg = DistillLossConfig(kind=kind, alpha=0.7)
    for temperature in (1.0, 2.0, 0.5):
        dense = _dense(h, ws, wt, targets, mask, temperature, cfg)
        sparse = _sparse(h, ws, h @ wt, targets, mask, temperature, cfg, k=11)
        assert set(sparse) <= set(dense)
        for key in sparse:
            np.testing.assert_allclose(
                sparse[key], dense[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} T={temperature}"
            )


def test_sparse_forward_kl_is_the_kl_of_the_buckets():
    h, ws, wt, targets, mask = _loss_inputs(vocab=13)
    k = 4
    out = _sparse(h, ws, h @ wt, targets, mask, 1.0, DistillLossConfig(alpha=1.0), k)
    logits_p, logits_q = np.asarray(h @ wt, np.float64), np.asarray(h @ ws, np.float64)
    p = np.exp(logits_p - np.logaddexp.reduce(logits_p, -1, keepdims=True))
    q = np.exp(logits_q - np.logaddexp.reduce(logits_q, -1, keepdims=True))
    top = np.argsort(-p, -1)[..., :k]
    p_top, q_top = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
    p_b = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
    q_b = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
    kl = (p_b * np.log(p_b / q_b)).sum(-1)
    np.testing.assert_allclose(out["kd_sum"], (kl * _mask(2, 5)).sum(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_loss_is_zero_at_the_teacher_and_its_gradient_finite(kind):
    h, _, wt, targets, mask = _loss_inputs()
    _, ws, *_ = _loss_inputs(seed=1)
    cfg = DistillLossConfig(kind=kind, alpha=1.0)

    @jax.jit
    @functools.partial(jax.value_and_grad, argnums=0)
    def loss(w, temperature, ids, logp, tail):
        out = chunked_sparse_distill_loss(
            h, lambda x: x @ w, ids, logp, tail, targets, mask, cfg, temperature=temperature
        )
        return out["kd_sum"]

    teacher = tuple(map(np.array, top_k_distribution(h @ wt, 4)))
    # Stored records with a token below the lowest code (no mass) and a position whose
    # tail has no mass.
    ids, logp, tail = (x.copy() for x in teacher)
    logp[0, 1, 3] = -50.0
    tail[1, 2] = -np.inf
    layout = Layout(4, 11)
    stored = decode(layout, encode(layout, ids, logp, tail))
    assert stored[1][0, 1, 3] == -jnp.inf and stored[2][1, 2] == -jnp.inf
    for temperature in (1.0, 3.0):
        assert abs(float(loss(wt, temperature, *teacher)[0])) < 1e-4
        value, grad = loss(ws, temperature, *stored)
        assert np.isfinite(value) and value > 0 and np.all(np.isfinite(grad))


def test_sparse_loss_keeps_fewer_tokens_by_moving_the_rest_to_the_tail():
    h, ws, wt, targets, mask = _loss_inputs(vocab=13)
    cfg = DistillLossConfig(kind="jsd")
    from_8 = _sparse(h, ws, h @ wt, targets, mask, 2.0, dataclasses.replace(cfg, top_k=3), k=8)
    direct = _sparse(h, ws, h @ wt, targets, mask, 2.0, cfg, k=3)
    np.testing.assert_allclose(from_8["kd_sum"], direct["kd_sum"], rtol=1e-5)
    with pytest.raises(ConfigError, match="top_k=9 exceeds the k=8 tokens"):
        _sparse(h, ws, h @ wt, targets, mask, 2.0, dataclasses.replace(cfg, top_k=9), k=8)


# ---- distillation from the cache -------------------------------------------------------------


def _distill_cfg(teacher, logits_dir, steps, **distill):
    c = _cfg(teacher)
    c.train.steps = steps
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.checkpoint.save_every = 2
    c.checkpoint.async_save = False
    c.model.dtype = "float32"
    c.teacher.logits_dir = str(logits_dir)
    c.distill.update(dict(alpha=1.0, temperature=1.0) | distill)
    return c


def test_distilling_from_a_full_cache_equals_the_live_teacher(teachers, tmp_path):
    from llama_jax.distill import recipe as distill

    full = tmp_path / "full"
    _write(_cfg(teachers[0]), full, top_k=263, steps=1)
    live_cfg = _distill_cfg(teachers[0], "", 1)
    live = distill.run(live_cfg, str(tmp_path / "live"))
    cached = distill.run(_distill_cfg(teachers[0], full, 1), str(tmp_path / "cached"))
    # Every token stored: the KL differs from the live one by the log-probs' rounding only.
    assert abs(cached["kd"] - live["kd"]) < 2e-3 < live["kd"]
    assert cached["ce"] == pytest.approx(live["ce"], rel=1e-6)
    meta = runs.latest_meta(tmp_path / "cached")
    assert meta["teacher"]["logits_dir"] == str(full)
    live_fingerprint = runs.latest_meta(tmp_path / "live")["teacher"]["fingerprint"]
    assert fingerprint_mismatch(meta["teacher"]["fingerprint"], live_fingerprint) is None


def test_a_cached_run_resumes_bit_for_bit_and_another_run_is_refused(cache_dir, teachers, tmp_path):
    import orbax.checkpoint as ocp

    from llama_jax.distill import recipe as distill

    cfg = _distill_cfg(teachers[0], cache_dir, STEPS, top_k=4)
    work = tmp_path / "run"
    last = distill.run(cfg, str(work))
    assert np.isfinite(last["loss"]) and last["kd"] > 0 and "teacher_nll" not in last
    read = lambda: ocp.StandardCheckpointer().restore(str(work / "checkpoints" / "4" / "state"))
    straight = read()
    shutil.rmtree(work / "checkpoints" / "4")
    distill.run(cfg, str(work))
    jax.tree.map(np.testing.assert_array_equal, straight, read())

    other = _distill_cfg(teachers[0], cache_dir, STEPS)
    other.data.seed = 3
    with pytest.raises(ConfigError, match="data.seed: cache 0, run 3"):
        distill.run(other, str(tmp_path / "other"))
    wider = _distill_cfg(teachers[0], cache_dir, STEPS, top_k=9)
    with pytest.raises(ConfigError, match="distill.top_k=9, cache k=8"):
        distill.run(wider, str(tmp_path / "wider"))
    moved = _distill_cfg(teachers[1], cache_dir, STEPS)
    with pytest.raises(ConfigError, match="teacher: cache"):
        distill.run(moved, str(tmp_path / "moved"))
    features = _distill_cfg(teachers[0], cache_dir, STEPS, features="0:0")
    with pytest.raises(ConfigError, match="holds no hidden states"):
        distill.run(features, str(tmp_path / "features"))
    for d in ("other", "wider", "moved", "features"):
        assert not (tmp_path / d / "checkpoints").exists()
