"""Training: the same losses on every mesh and across processes, exact resume after
kill -9, restore onto another mesh, learning, and errors before compilation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import processes
import pytest
from flax import nnx

from configs import tiny
from llama_jax import sharding
from llama_jax.config import get_preset
from llama_jax.errors import ConfigError, NonFiniteLossError
from llama_jax.nn.model import Llama
from llama_jax.train import loop as train
from llama_jax.train import metrics as train_metrics
from llama_jax.train import optim
from llama_jax.train import step as train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_preset("tiny")


def _batch(b=8, t=32):
    rs = np.random.RandomState(0)
    tokens = rs.randint(3, CFG.vocab_size, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, 20:] = 2
    seg[0, 28:] = 0
    mask = (seg > 0) & (np.roll(seg, -1, 1) == seg)
    mask[:, -1] = False
    return dict(
        tokens=tokens,
        segment_ids=seg,
        targets=np.roll(tokens, -1, 1),
        loss_mask=mask.astype(np.int32),
    )


def _losses(mesh_axes, devices=8, grad_accum=1, steps=3):
    mesh = sharding.create_mesh(devices=jax.devices()[:devices], **mesh_axes)
    opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    tx = optim.make_optimizer(opt)
    model = sharding.create_sharded(lambda: Llama(CFG, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    state, shardings = train_step.init_state(nnx.to_pure_dict(state), tx, mesh)
    batch_sh = train_step.batch_sharding(mesh, sharding.DEFAULT_RULES, (8, 32))
    step_fn = train_step.make_train_step(
        graphdef, tx, optim.learning_rate_schedule(opt), grad_accum=grad_accum, loss_chunk=12
    )
    step = train_step.jit_train_step(step_fn, shardings, batch_sh)
    batch = {k: jax.device_put(v, batch_sh) for k, v in _batch().items()}
    losses = []
    with sharding.activation_sharding(mesh):
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.asarray(losses), state


@pytest.fixture(scope="module")
def reference_losses():
    return _losses(dict(fsdp=1), devices=1)[0]


@pytest.mark.parametrize(
    "axes",
    [
        dict(data=8, fsdp=1),
        dict(fsdp=8),
        dict(data=2, fsdp=1, tensor=4),
        dict(data=2, fsdp=2, tensor=2),
    ],
)
def test_same_losses_on_every_mesh(axes, reference_losses):
    losses, state = _losses(axes)
    assert reference_losses[-1] < reference_losses[0] - 0.1
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    # Optimizer moments live where their parameters do.
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["up_proj"]["kernel"]
    kernel = state.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec


def test_gradient_accumulation_equals_one_big_batch(reference_losses):
    losses, _ = _losses(dict(data=2, fsdp=2, tensor=2), grad_accum=2)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def test_weight_decay_skips_norms_and_biases():
    params = {"a_norm": {"scale": 1}, "proj": {"kernel": 1, "bias": 1}, "embed": {"e": 1}}
    assert optim.decay_mask(params) == {
        "a_norm": {"scale": False},
        "proj": {"kernel": True, "bias": False},
        "embed": {"e": True},
    }


def test_learning_rate_schedule():
    sched = optim.learning_rate_schedule(
        optim.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    )
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55, abs=1e-3)
    assert float(sched(110)) == pytest.approx(0.1)


# --- end to end through launch.train ---------------------------------------


def _cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.data.global_batch=8",
        "--config.data.seq_len=64",
        "--config.train.log_every=1",
        *overrides,
    ]


def _env(devices=8, **extra):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(workdir, *overrides, devices=8, timeout=300):
    proc = subprocess.run(
        _cmd(workdir, *overrides),
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _run_here(workdir, **changes):
    """train.run in this process with _cmd's settings (no interpreter start-up)."""
    base = dict(data__global_batch=8, data__seq_len=64, train__log_every=1)
    return train.run(_config(**(base | changes)), str(workdir))


def _logged_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _final_state(workdir, step):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )


def test_loss_falls_on_real_text(tmp_path, capsys):
    _run_here(tmp_path, train__steps=60, train__log_every=20)
    losses = _logged_losses(tmp_path)
    assert losses[60] < losses[20] - 1.0, losses
    assert "step 60/60" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "config.json")
    assert os.listdir(tmp_path / "tensorboard")


def test_where_the_time_goes_is_logged_and_a_profile_is_written(tmp_path, capsys):
    last = _run_here(tmp_path, train__steps=4, train__profile_steps="2:3")
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 <= r["data_wait_frac"] < 1 for r in steps)
    assert steps[0]["compile_s"] > 0 and "compile_s" not in steps[1]
    (summary,) = [r for r in records if "run/goodput" in r]
    assert summary["step"] == 4 and 0 < summary["run/goodput"] <= 1
    assert summary["run/startup_s"] > 0 and steps[0]["startup_s"] == summary["run/startup_s"]
    assert all(r["step_time_s"] > 0 for r in steps[1:])
    fractions = [summary[f"run/{k}_frac"] for k in train_metrics.LOST_TIME]
    assert sum(fractions) + summary["run/goodput"] == pytest.approx(1.0)
    assert summary["run/wall_s"] == pytest.approx(
        summary["run/train_s"] + sum(summary[f"run/{k}_s"] for k in train_metrics.LOST_TIME)
    )
    assert last["run/goodput"] == summary["run/goodput"]
    out = capsys.readouterr().out
    assert "data wait" in out and "training steps (goodput)" in out and "ms/step" in out
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces)


def test_a_resumed_run_profiles_the_rest_of_its_range(tmp_path, capsys):
    _run_here(tmp_path, train__steps=2, checkpoint__save_every=2)
    assert not (tmp_path / "profile").exists()
    _run_here(tmp_path, train__steps=4, checkpoint__save_every=2, train__profile_steps="2:3")
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    _run_here(tmp_path, train__steps=5, train__profile_steps="1:2")
    assert "train.profile_steps=1:2 lies before the resumed step 5" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["3", "0:2", "3:2", "2:99"])
def test_bad_profile_steps_are_refused(tmp_path, spec):
    with pytest.raises(ValueError, match=f"train.profile_steps={spec!r}"):
        train.run(_config(train__steps=4, train__profile_steps=spec), str(tmp_path))


def test_kill_minus_9_then_resume_is_bitwise_equal(tmp_path):
    steps = ["--config.train.steps=30", "--config.checkpoint.save_every=10"]
    _run(tmp_path / "straight", *steps)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(killed, *steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoints" / "10" / "commit_success.txt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    assert not (killed / "checkpoints" / "30").exists()
    _run(killed, *steps)
    a, b = _final_state(tmp_path / "straight", 30), _final_state(killed, 30)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_on_another_mesh(tmp_path):
    _run_here(tmp_path / "one", train__steps=6, mesh__fsdp=8)
    two = tmp_path / "two"
    _run_here(two, train__steps=3, mesh__fsdp=8)
    _run_here(two, train__steps=6, mesh__data=2, mesh__tensor=2, mesh__fsdp=-1)
    a, b = _logged_losses(tmp_path / "one"), _logged_losses(two)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)


def test_two_processes_reproduce_single_process_losses(tmp_path):
    steps = ["--config.train.steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=-1"]
    _run_here(tmp_path / "single", train__steps=3, mesh__data=2, mesh__fsdp=-1)
    port = processes.free_port()
    processes.run_together(
        [
            _cmd(
                tmp_path / "multi",
                *steps,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            )
            for i in range(2)
        ],
        env=_env(devices=4),
        timeout=300,
    )
    a, b = _logged_losses(tmp_path / "single"), _logged_losses(tmp_path / "multi")
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="not finite"):
        _run_here(
            tmp_path,
            train__steps=20,
            checkpoint__save_every=1,
            train__learning_rate=1e30,
            train__warmup_steps=0,
            train__clip_norm=1e30,
        )
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved, "expected the good steps before the blow-up to be saved"
    state = _final_state(tmp_path, saved[-1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def _config(**changes):
    cfg = tiny.get_config()
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    return cfg


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mesh__data=3, mesh__fsdp=1), "expected the 8 available"),
        (dict(data__global_batch=12), "not divisible by the 8 batch shards"),
        (dict(model__preset="llama9-1b"), "llama9-1b"),
        (dict(data__path="/nonexistent/train.txt"), "/nonexistent/train.txt"),
        (dict(train__grad_accum=3), "grad_accum=3"),
        (dict(mesh__rules="vocab=model"), "model"),
        (dict(model__dtype="float8"), "float8"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, changes, match):
    start = time.time()
    with pytest.raises(ValueError, match=match):
        train.run(_config(**changes), str(tmp_path))
    assert time.time() - start < 10
    assert not os.path.exists(tmp_path / "checkpoints")


def test_sigterm_saves_and_stops_then_resumes(tmp_path, capsys):
    steps = ["--config.train.steps=400", "--config.checkpoint.save_every=1000"]
    proc = subprocess.Popen(
        _cmd(tmp_path, *steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preemption notice" in out
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 400
    capsys.readouterr()
    _run_here(tmp_path, train__steps=saved[0] + 2)
    assert f"resumed from step {saved[0]}" in capsys.readouterr().out


def test_resume_with_other_data_settings_is_refused(tmp_path):
    cfg = _config(train__steps=2, data__global_batch=8, data__seq_len=32)
    train.run(cfg, str(tmp_path))
    cfg = _config(train__steps=4, data__global_batch=8, data__seq_len=32, data__seed=7)
    with pytest.raises(ConfigError, match=r"data\.seed: 0 -> 7"):
        train.run(cfg, str(tmp_path))


# A run written by an earlier version of the project (tiny preset, 2 steps on the
# 32-token rows of run_before_redesign_tokens.npy, read by the relative path
# "tokens.npy"): later versions must keep resuming and reading such runs.
OLD_RUN = os.path.join(REPO, "tests", "data", "run_before_redesign")


def test_a_run_written_by_an_earlier_version_resumes_and_loads(tmp_path, monkeypatch):
    from llama_jax.formats import model_dir

    shutil.copytree(OLD_RUN, tmp_path / "run")
    shutil.copy(OLD_RUN + "_tokens.npy", tmp_path / "tokens.npy")
    monkeypatch.chdir(tmp_path)
    saved = _final_state(tmp_path / "run", 2)
    cfg = _config(
        data__path="tokens.npy",
        data__format="tokens",
        data__tokenizer="",
        data__seq_len=32,
        data__global_batch=8,
        train__steps=4,
        train__log_every=1,
        checkpoint__save_every=2,
        checkpoint__keep=1,
        checkpoint__async_save=False,
    )
    last = train.run(cfg, "run")
    assert np.isfinite(last["loss"])
    assert sorted(_logged_losses(tmp_path / "run")) == [1, 2, 3, 4]
    resumed = _final_state(tmp_path / "run", 4)
    assert int(resumed["step"]) == 4
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), saved["params"], resumed["params"])
    assert all(jax.tree.leaves(moved))
    model, config = model_dir.load_model("run")
    assert config == CFG
    logits = model(np.arange(1, 9, dtype=np.int32)[None])
    assert np.isfinite(np.asarray(logits)).all()
