"""Metrics: JSONL + TensorBoard writer, peak FLOPs table, FLOPs formula, throughput, lines."""

import json
import math
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from llama_jax.train import metrics
from llama_jax.train.metrics import (
    MetricsWriter,
    Throughput,
    peak_flops_per_device,
    progress_line,
    train_flops_per_token,
)


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing)."""
    data = path.read_bytes()
    assert path.name.startswith("events.out.tfevents") and data
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12 : offset + 12 + length])
        yield event
        offset += 12 + length + 4


def test_writer_appends_json_lines_and_tensorboard_events(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "lr": np.float64(3e-4), "tokens": 4096})
        writer.write(2, {"loss": jnp.asarray(2.25, jnp.bfloat16), "note": "eval", "nan": math.nan})
        with pytest.raises(ValueError, match=r"metric 'logits' .* shape \(3,\)"):
            writer.write(3, {"logits": jnp.ones(3)})
        with pytest.raises(ValueError, match="'step'"):
            writer.write(3, {"step": 3})
    with MetricsWriter(tmp_path) as writer:  # a resumed run appends
        writer.write(3, {"loss": 2.0})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0] == {"step": 1, "loss": 2.5, "lr": 3e-4, "tokens": 4096}
    assert isinstance(records[0]["tokens"], int)
    assert records[1]["loss"] == 2.25 and records[1]["note"] == "eval"
    assert math.isnan(records[1]["nan"])
    assert records[2] == {"step": 3, "loss": 2.0}
    scalars = sorted(
        (event.step, value.tag, value.simple_value)
        for name in os.listdir(tmp_path / "tensorboard")
        for event in _events(tmp_path / "tensorboard" / name)
        for value in event.summary.value
    )
    assert [s[:2] for s in scalars] == [
        (1, "loss"),
        (1, "lr"),
        (1, "tokens"),
        (2, "loss"),
        (2, "nan"),
        (3, "loss"),
    ]
    assert scalars[0][2] == 2.5 and scalars[3][2] == 2.25 and math.isnan(scalars[4][2])


def test_writer_does_nothing_when_disabled_or_not_process_zero(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path / "off", enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "host1") as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists() and not (tmp_path / "host1").exists()


def test_peak_flops_by_device_kind():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("TPU v4 lite") is None
    assert peak_flops_per_device() is None  # the test devices are CPUs


def test_train_flops_per_token_llama2_7b():
    # LLaMA-2 7B at T=4096: 6.74e9 matmul weights, L=32, N=32, H=128.
    n, layers, heads, head_dim, t = 6_738_415_616, 32, 32, 128, 4096
    flops = train_flops_per_token(n, layers, heads, head_dim, t)
    assert flops == 6 * n + 6 * 32 * 32 * 128 * 4096
    # Causal attention: half of the 12*L*D*T of full attention.
    assert flops - 6 * n == 12 * layers * (heads * head_dim) * t / 2


def test_throughput_rates_mfu_and_eta(monkeypatch):
    clock = iter([100.0, 102.0, 103.0, 200.0, 201.0])
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = Throughput(1e9, total_steps=110, start_step=0, peak_flops=1e12, num_devices=4)
    out = meter.update(10, tokens=80_000)  # 10 steps in 2 s
    assert out["tokens_per_s"] == 40_000
    assert out["step_time_s"] == 0.2
    assert out["mfu"] == pytest.approx(40_000 * 1e9 / 4e12)
    assert out["eta_s"] == pytest.approx(100 * 0.2)
    out = meter.update(15, tokens=10_000)  # 5 steps in 1 s
    assert out["tokens_per_s"] == 10_000 and out["step_time_s"] == 0.2
    with pytest.raises(ValueError, match="step=15; expected a step after the last one"):
        meter.update(15, tokens=1)
    assert Throughput(1e9, total_steps=10).update(1, 1)["mfu"] is None  # CPU: unknown peak


def test_progress_line():
    line = progress_line(
        120,
        1000,
        {
            "loss": np.float32(2.34567),
            "lr": 3e-4,
            "grad_norm": 1.2345,
            "tokens_per_s": 12345.6,
            "mfu": 0.4123,
            "eta_s": 3600 * 26 + 754.4,
        },
    )
    assert line == (
        "step 120/1000 | loss 2.3457 | lr 3.00e-04 | grad_norm 1.234 | 12,346 tok/s | "
        "MFU 41.2% | ETA 26:12:34"
    )
    assert progress_line(5, 10, {"loss": 1.0, "mfu": None}) == "step 5/10 | loss 1.0000"
