"""Checkpointer: round trips, pruning, other meshes, damaged and failed saves; SIGTERM."""

import json
import logging
import os
import shutil
import signal
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import processes
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from llama_jax.errors import CheckpointError
from llama_jax.formats import runs
from llama_jax.formats.runs import latest_intact_step
from llama_jax.train.checkpointer import Checkpointer, PreemptionWatch

META = {"data": {"epoch": 1, "offset": 4096}, "teacher": "sha256:abc"}


def _mesh(shape, names):
    return Mesh(np.asarray(jax.devices()).reshape(shape), names)


def _state(seed=0):
    """A train-state-like dict, sharded over data=8, with awkward sizes and dtypes."""
    mesh = _mesh((8,), ("data",))
    k1, k2 = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k1, (16, 24), jnp.float32)
    emb = jax.random.normal(k2, (24, 5), jnp.bfloat16)
    state = {
        "params": {"w": w, "emb": emb, "scale": jnp.arange(7, dtype=jnp.float32) + seed},
        "opt_state": {"mu": {"w": w * 0.5}, "count": jnp.asarray(3 + seed, jnp.int32)},
        "step": jnp.asarray(seed, jnp.int32),
    }
    specs = {
        "params": {"w": P("data"), "emb": P("data"), "scale": P()},
        "opt_state": {"mu": {"w": P(None, "data")}, "count": P()},
        "step": P(),
    }
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)


def _abstract(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _replicated(state):
    mesh = _mesh((8,), ("data",))
    return _abstract(state, jax.tree.map(lambda _: NamedSharding(mesh, P()), state))


def _assert_bit_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_dtypes(a, b)
    chex.assert_trees_all_equal(a, b)


def test_async_save_restore_round_trip(tmp_path):
    state = _state()
    with Checkpointer(tmp_path / "checkpoints", save_every=2, keep=3) as ckpt:
        assert not ckpt.save(1, state, META)
        assert ckpt.save(2, state, META)
        ckpt.wait()
        assert ckpt.all_steps() == [2]
        assert ckpt.latest_step() == 2
        step, restored, meta = ckpt.restore(_replicated(state))
    assert step == 2
    assert meta == META
    _assert_bit_equal(restored, state)


def test_keep_prunes_the_oldest_steps(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state, META)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_restore_onto_another_mesh_and_one_device(tmp_path):
    state = _state(seed=1)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(5, state, META)

    cube = _mesh((2, 2, 2), ("x", "y", "z"))
    specs = {
        "params": {"w": P(("x", "y"), "z"), "emb": P(None, None), "scale": P()},
        "opt_state": {"mu": {"w": P("z", ("x", "y"))}, "count": P()},
        "step": P(),
    }
    on_cube = jax.tree.map(lambda s: NamedSharding(cube, s), specs)
    one = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[3]), state)
    for shardings in (on_cube, one):
        _, restored, _ = Checkpointer(tmp_path, save_every=1, keep=1).restore(
            _abstract(state, shardings)
        )
        _assert_bit_equal(restored, state)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
            assert x.sharding == s


def _truncate_data(step_dir):
    for name in os.listdir(step_dir / "state" / "d"):
        with open(step_dir / "state" / "d" / name, "r+b") as f:
            f.truncate(10)


DAMAGE = {
    "truncated_data": (_truncate_data, "reading it"),
    "deleted_manifest": (lambda d: os.remove(d / "state" / "manifest.ocdbt"), "reading it"),
    "no_commit_marker": (lambda d: os.remove(d / "commit_success.txt"), "commit_success.txt"),
    "truncated_meta": (lambda d: open(d / "meta" / "metadata", "w").close(), "reading it"),
}


# Orbax's metadata read of a damaged checkpoint leaves TensorStore callbacks behind that
# find their event loop closed; that noise is Orbax's, the error it raises is ours to test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_with_a_warning(tmp_path, caplog, damage):
    damage_fn, reason = DAMAGE[damage]
    old, new = _state(seed=1), _state(seed=2)
    with Checkpointer(tmp_path, save_every=10, keep=3) as ckpt:
        ckpt.save(10, old, {"at": 10})
        ckpt.save(20, new, {"at": 20})
    damage_fn(tmp_path / "20")

    ckpt = Checkpointer(tmp_path, save_every=10, keep=3)
    if damage == "no_commit_marker":  # Orbax lists it; we do not
        assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10
    with caplog.at_level(logging.WARNING):
        step, restored, meta = ckpt.restore(_replicated(old))
    assert (step, meta) == (10, {"at": 10})
    _assert_bit_equal(restored, old)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 20" in w and "damaged" in w and reason in w for w in warnings), warnings
    with pytest.raises(CheckpointError, match=f"step 20 .* is damaged: .*{reason}"):
        ckpt.restore(_replicated(old), step=20)

    # Resuming from step 10 saves step 20 again; the damaged one is kept aside, not lost.
    assert ckpt.save(20, new, {"at": 20})
    ckpt.close()
    assert (tmp_path / "20.damaged").is_dir()
    step, restored, _ = Checkpointer(tmp_path, save_every=10, keep=3).restore(_replicated(new))
    assert step == 20
    _assert_bit_equal(restored, new)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_model_readers_skip_a_damaged_latest_step_with_a_warning(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    with Checkpointer(checkpoints, save_every=10, keep=3) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, _state(seed=step), {"at": step})
    assert latest_intact_step(checkpoints) == 30
    assert runs.latest_meta(tmp_path) == {"at": 30}

    os.remove(checkpoints / "30" / "state" / "_METADATA")
    shutil.rmtree(checkpoints / "20" / "meta")
    with caplog.at_level(logging.WARNING):
        assert latest_intact_step(checkpoints) == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 30" in w and "damaged" in w and "metadata" in w for w in warnings), warnings
    assert any("step 20" in w and "damaged" in w and "meta/" in w for w in warnings), warnings
    assert runs.latest_step_dir(tmp_path) == checkpoints / "10"
    assert runs.latest_meta(tmp_path) == {"at": 10}

    shutil.rmtree(checkpoints / "10" / "state")
    with pytest.raises(CheckpointError, match=r"checkpoints holds no complete checkpoint; damaged"):
        latest_intact_step(checkpoints)
    with pytest.raises(CheckpointError, match=r"checkpoints holds no complete checkpoint"):
        runs.latest_meta(tmp_path)


def test_failed_save_keeps_the_previous_step_and_its_tmp_dir_is_ignored(tmp_path, monkeypatch):
    state = _state()
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(1, state, META)
    ckpt.wait()

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self):
        if self.get_final().name == "2":
            raise OSError("No space left on device (simulated)")
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    assert ckpt.save(2, state, META)
    with pytest.raises(CheckpointError, match="saving step 2 .* failed: OSError: No space"):
        ckpt.wait()
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    assert ckpt.all_steps() == [1]
    fresh = Checkpointer(tmp_path, save_every=1, keep=1)
    assert fresh.latest_step() == 1
    assert fresh.restore(_replicated(state))[0] == 1
    ckpt.close()


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    state = _state()
    missing = tmp_path / "never_written"
    with pytest.raises(CheckpointError, match=f"no complete checkpoint in {missing}$"):
        Checkpointer(missing, save_every=1, keep=1).restore(_replicated(state))
    assert not missing.exists(), "restore must not write"

    with Checkpointer(tmp_path / "ck", save_every=1, keep=1) as ckpt:
        ckpt.save(3, state, META)
    os.remove(tmp_path / "ck" / "3" / "commit_success.txt")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*ck; damaged: step 3"):
        Checkpointer(tmp_path / "ck", save_every=1, keep=1).restore(_replicated(state))
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .* complete steps: \[\]"):
        Checkpointer(tmp_path / "ck", save_every=1, keep=1).restore(_replicated(state), step=7)


def test_mismatched_state_is_an_error_not_a_fallback(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, state, META)
        ckpt.save(2, state, META)
    abstract = _replicated(state)
    abstract["params"]["w"] = jax.ShapeDtypeStruct((16, 25), jnp.float32, sharding=None)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2)
    with pytest.raises(CheckpointError, match="'params/w' is ShapeDtypeStruct"):
        ckpt.restore(abstract)
    abstract["params"]["w"] = jax.ShapeDtypeStruct(
        (16, 25), jnp.float32, sharding=abstract["step"].sharding
    )
    abstract["extra"] = abstract["step"]
    with pytest.raises(CheckpointError, match=r"step 2 .*missing extra; params/w has shape"):
        ckpt.restore(abstract)


def test_save_refuses_to_overwrite_and_bad_arguments(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, state, META)
        ckpt.wait()
        with pytest.raises(CheckpointError, match="step 1 already has a complete checkpoint"):
            ckpt.save(1, state, META, force=True)
        with pytest.raises(CheckpointError, match="meta for step 2 is not JSON"):
            ckpt.save(2, state, {"x": object()})
        assert ckpt.all_steps() == [1]
    with pytest.raises(ValueError, match="save_every=0"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(tmp_path, save_every=1, keep=0)


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    def previous(signum, frame):
        raise AssertionError("the watch should have replaced this handler")

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionWatch() as watch:
            assert not watch.requested
            assert not watch.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert watch.requested
            assert watch.should_stop(2)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


_WORKER = r"""
import json, os, signal, sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from llama_jax.train.checkpointer import Checkpointer, PreemptionWatch

process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
devices = np.asarray(jax.devices())
full = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
line = NamedSharding(Mesh(devices, ("data",)), P("data"))
w = jax.make_array_from_callback(full.shape, line, lambda index: full[index])
cube = NamedSharding(Mesh(devices.reshape(2, 2, 2), ("x", "y", "z")), P("z", ("x", "y")))
with PreemptionWatch(check_every=2) as watch, Checkpointer(
    directory, save_every=100, keep=2
) as ckpt:
    for step in range(1, 10):
        if step == 3 and process_id == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if watch.should_stop(step):
            ckpt.save(step, {"w": w * step}, {"stopped_at": step}, force=True)
            break
    restored_step, state, meta = ckpt.restore(
        {"w": jax.ShapeDtypeStruct(full.shape, jnp.float32, sharding=cube)}
    )
equal = all(
    np.array_equal(np.asarray(shard.data), step * full[shard.index])
    for shard in state["w"].addressable_shards
)
print(json.dumps(dict(stopped_at=step, requested=watch.requested, restored=restored_step,
                      meta=meta, equal=equal)))
jax.distributed.shutdown()
"""


def test_two_processes_agree_to_stop_then_save_and_restore_on_another_mesh(tmp_path):
    port = processes.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    outputs = processes.run_together(
        [
            [sys.executable, "-c", _WORKER, str(i), str(port), str(tmp_path / "checkpoints")]
            for i in range(2)
        ],
        env=env,
    )
    results = [json.loads(processes.last_json_line(out)) for out in outputs]
    # Only process 1 got SIGTERM (at step 3); both stop at the next check, step 4.
    assert [r["requested"] for r in results] == [False, True]
    for r in results:
        assert r == dict(r, stopped_at=4, restored=4, meta={"stopped_at": 4}, equal=True)
