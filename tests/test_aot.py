"""Ahead-of-time compilation for TPU slices on the CPU (llama_jax.aot, launch.compile):
the train, distillation and LoRA steps compile for v5p:2x2x1 with per-chip memory
figures that add up, splash attention is in the compiled steps, topology names, and
the command's errors."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import distill_tiny, lora_tiny, tiny
from llama_jax.config import get_preset
from llama_jax.errors import ConfigError
from llama_jax.tpu import aot, topology
from llama_jax.train.run_config import apply_overrides

pytest.importorskip("libtpu", reason="libtpu is not installed (make test installs it)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5p:2x2x1"
# Two layers, D 256, V 512, 256-token rows: small enough to compile in seconds, with
# the head dims and lengths splash takes.
BODY = "vocab_size=512,embed_dim=256,mlp_dim=512,num_layers=2,max_position_embeddings=1024"
HEADS = {
    64: "num_heads=4,num_kv_heads=2,head_dim=64",
    128: "num_heads=2,num_kv_heads=1,head_dim=128",
}


@pytest.fixture(scope="module")
def target():
    try:
        return topology.tpu_target(TOPOLOGY)
    except ConfigError as e:
        pytest.skip(f"the TPU compiler is unavailable here: {e}")


def _small(c, head_dim):
    c.model.overrides = f"{BODY},{HEADS[head_dim]}"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots_no_batch"
    c.data.seq_len = 256
    c.data.global_batch = 8
    c.train.loss_chunk = 128
    return c


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """Head dim -> a model directory holding only the config.json of a teacher with
    that head dim: its shapes are all a compile needs."""
    dirs = {}
    for head_dim in HEADS:
        config = apply_overrides(get_preset("tiny"), f"{BODY},{HEADS[head_dim]}")
        path = tmp_path_factory.mktemp(f"teacher{head_dim}")
        (path / "config.json").write_text(json.dumps(config.to_hf()))
        dirs[head_dim] = str(path)
    return dirs


def _config(kind, head_dim, teacher_dirs):
    if kind == "train":
        return _small(tiny.get_config(), head_dim)
    if kind == "lora":
        return _small(lora_tiny.get_config(), head_dim)
    # The teacher has the other head dim, so one compile holds both.
    c = _small(distill_tiny.get_config(teacher_dirs[192 - head_dim]), head_dim)
    c.teacher.dtype = "bfloat16"
    return c


_reports: dict = {}


def _report(target, teacher_dirs, kind, head_dim=64):
    """Compiled once per module (and pytest worker)."""
    key = (kind, head_dim)
    if key not in _reports:
        # conftest asks for float32 matmuls (CPU parity); a run uses the default.
        with jax.default_matmul_precision("default"):
            _reports[key] = aot.compile_config(_config(kind, head_dim, teacher_dirs), target)
    return _reports[key]


def _check_adds_up(report, parts):
    assert list(report.parts) == parts
    assert all(n > 0 for n in report.parts.values()), report.parts
    for name in ("temporaries", "code", "outputs", "capacity"):
        assert getattr(report, name) > 0, name
    # Each argument's shard, padded to its compiled layout's tiles, is what XLA counts.
    assert sum(report.parts.values()) == report.xla_arguments
    assert 0 < report.unpadded_arguments <= report.xla_arguments
    assert report.total == (
        report.xla_arguments + report.outputs + report.temporaries + report.code
    )
    assert report.capacity == int(95.74 * aot.GiB)
    assert report.headroom == pytest.approx(1 - report.total / report.capacity)
    assert report.fits
    assert report.compile_seconds > 0
    assert set(report.collectives) == set(aot.COLLECTIVES)
    # Parameters split over 4 chips are gathered for the forward pass somehow.
    assert report.collectives["all-gather"] + report.collectives["collective-permute"] > 0
    report.check_fits()
    assert "total" in report.table() and report.to_dict()["fits"] is True


def test_train_step_compiles_with_memory_that_adds_up(target, teacher_dirs):
    report = _report(target, teacher_dirs, "train")
    _check_adds_up(report, ["parameters (float32)", "optimizer state", "batch"])
    # Adam's two moments are each the size of the parameters.
    assert report.parts["optimizer state"] >= 2 * report.parts["parameters (float32)"]


def test_distill_step_takes_the_teacher_as_an_argument(target, teacher_dirs):
    report = _report(target, teacher_dirs, "distill")
    _check_adds_up(
        report,
        ["student parameters (float32)", "optimizer state", "teacher (bfloat16)", "batch"],
    )
    assert report.kind == "distill"
    # Shapes from the teacher directory's config.json: head dim 128 for a student's 64.
    assert "teacher L2 D256 N2 K1 H128" in report.settings["models"]


def test_lora_step_takes_the_frozen_base_as_an_argument(target, teacher_dirs):
    report = _report(target, teacher_dirs, "lora")
    _check_adds_up(
        report,
        ["LoRA adapters (float32)", "optimizer state", "frozen base (bfloat16)", "batch"],
    )
    assert report.parts["frozen base (bfloat16)"] > report.parts["LoRA adapters (float32)"]


def _kernel_head_dims(hlo_text, seq_len=256):
    """Head dims of the q/k/v operands of Mosaic kernels ([..., T, H] shapes)."""
    calls = [line for line in hlo_text.splitlines() if aot.KERNEL_CALL in line]
    return {int(h) for line in calls for h in re.findall(rf",{seq_len},(\d+)\]", line)}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", ["train", "distill"])
def test_splash_kernel_is_in_the_compiled_step(target, teacher_dirs, kind, head_dim):
    report = _report(target, teacher_dirs, kind, head_dim)
    assert report.kernel_calls > 0, "no Mosaic kernel in the compiled step"
    assert "splash" in report.hlo_text
    # A distillation student with one head dim and its teacher with the other both
    # run splash.
    expected = {head_dim} if kind == "train" else {64, 128}
    assert _kernel_head_dims(report.hlo_text) >= expected


def test_topology_names():
    assert topology.topology_name("v5p-64")[1] == "v5p:2x4x4"
    assert topology.topology_name("v4-32")[1] == "v4:2x2x4"
    assert topology.topology_name("v6e-64")[1] == "v6e:8x8"
    assert topology.topology_name("v5e-16")[1] == "v5e:4x4"
    assert topology.topology_name("v5litepod-16")[1] == "v5e:4x4"
    assert topology.topology_name("v6e:2x4")[1] == "v6e:2x4"
    for bad, why in [
        ("v5p-12", "power of two"),
        ("v5p:4x4", "3 dimensions"),
        ("tpu-64", "unknown"),
    ]:
        with pytest.raises(ConfigError, match=why):
            topology.topology_name(bad)


def test_without_a_topology_only_a_tpu_host_is_a_target():
    with pytest.raises(ConfigError, match="this host has no TPU"):
        topology.local_target()


def test_slices_become_the_dcn_axis(target):
    two = topology.tpu_target(TOPOLOGY, num_slices=2)
    assert len(two.devices) == 2 * len(target.devices)
    built = aot.build(_config("train", 64, {}), two)
    assert dict(built.plan.mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}


def test_collective_counts_async_pairs_once_and_fused_reduce_scatter():
    hlo = """
%all-reduce-scatter.1 (p: f32[8,4]) -> f32[2,4] {
  %all-reduce.1 = f32[8,4]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}
  ROOT %ds = f32[2,4]{1,0} dynamic-slice(%all-reduce.1, %i, %j)
}

ENTRY %main (a: bf16[2,4]) -> f32[2,4] {
  %all-gather-start.2 = (bf16[2,4], bf16[8,4]) all-gather-start(%a), dimensions={0}
  %all-gather-done.2 = bf16[8,4]{1,0} all-gather-done(%all-gather-start.2)
  %fusion.3 = f32[2,4]{1,0} fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
  %all-reduce.4 = f32[]{:T(128)} all-reduce(%s), to_apply=%add
  ROOT %collective-permute.5 = f32[2,4] collective-permute(%fusion.3), source_target_pairs={{0,1}}
}
"""
    assert aot.collective_counts(hlo) == {
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-reduce": 1,
        "all-to-all": 0,
        "collective-permute": 1,
    }


def _command(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "launch.compile", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_command_exits_2_naming_what_to_change_when_the_step_does_not_fit(target):
    # LLaMA 3 8B's vocabulary and two of its layers, trained on one 16 GB v5e chip.
    proc = _command(
        "--config=configs/llama3_8b_pod.py",
        "--topology=v5e-1",
        "--config.model.overrides=num_layers=2",
        "--config.data.seq_len=256",
        "--config.data.global_batch=2",
        "--config.model.remat_policy=dots",
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (error,) = _errors(proc)
    assert "15.75 GiB" in error
    advice = proc.stderr[proc.stderr.index("error:") :]
    for knob in ("train.grad_accum=2", "model.remat_policy=dots", "mesh:", "train.loss_chunk"):
        assert knob in advice, advice


def test_command_refuses_an_unknown_topology():
    proc = _command("--config=configs/tiny.py", "--topology=v9z-8")
    assert proc.returncode == 2
    assert _errors(proc) == [
        "error: topology 'v9z-8' is unknown; expected a Cloud TPU name (v4-32, v5p-64: "
        "TensorCores; v5e-16, v6e-64: chips) or a topology (v5p:2x4x4, v6e:8x8)"
    ]


def test_command_refuses_a_mesh_the_chips_do_not_divide(target):
    proc = _command("--config=configs/tiny.py", "--topology=v5p-8", "--config.mesh.tensor=3")
    assert proc.returncode == 2
    (error,) = _errors(proc)
    assert "do not divide the 4 devices" in error and "v5p-8" in error, error
