"""Training metrics: JSONL and TensorBoard writers, throughput and MFU, progress lines,
and where a run's time goes."""

from __future__ import annotations

import json
import numbers
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

# Dense (no sparsity) bf16 peak per device, from the vendors' datasheets. TPU keys are
# exact `device_kind` strings (v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite").
_TPU_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
# GPU kinds carry memory and form factor ("NVIDIA H100 80GB HBM3"), so they are matched
# by substring, the more specific variants first.
_GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device (default: `jax.devices()[0]`), or None when
    the kind is unknown (CPUs among them)."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    if kind in _TPU_PEAK_FLOPS:
        return _TPU_PEAK_FLOPS[kind]
    for name, flops in _GPU_PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def train_flops_per_token(
    num_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token: `6 * num_params + 6 * num_layers * num_heads * head_dim *
    seq_len`.

    `6 * num_params`: forward and backward through each weight (2 FLOPs per multiply-add
    forward, twice that backward); count the weights that take part in matmuls (the
    output head, not an untied input embedding table). The attention term: per layer and
    token, the scores (q.k) and the weighted values each cost `2 * num_heads * head_dim`
    FLOPs per attended position; with a causal mask a token attends to `seq_len / 2`
    positions on average, so the forward costs `2 * num_layers * num_heads * head_dim *
    seq_len`, and forward + backward three times that. Rematerialisation is not counted
    (this is model FLOPs, as MFU requires).
    """
    return 6.0 * num_params + 6.0 * num_layers * num_heads * head_dim * seq_len


class Throughput:
    """Tokens per second, MFU and ETA over the interval between `update` calls.

    Args:
      flops_per_token: `train_flops_per_token(...)`.
      total_steps: the run's last step, for the ETA.
      start_step: the step the timing starts from (the first interval also counts
        compilation unless the caller updates once after the first step).
      peak_flops: peak FLOP/s per device; default `peak_flops_per_device()`. Without
        either, MFU is None.
      num_devices: devices the tokens are spread over; default `jax.device_count()`.
    """

    def __init__(
        self,
        flops_per_token: float,
        *,
        total_steps: int,
        start_step: int = 0,
        peak_flops: float | None = None,
        num_devices: int | None = None,
    ):
        self.flops_per_token = flops_per_token
        self.total_steps = total_steps
        self.peak_flops = peak_flops_per_device() if peak_flops is None else peak_flops
        self.num_devices = jax.device_count() if num_devices is None else num_devices
        self._step = start_step
        self._time = time.perf_counter()

    def update(self, step: int, tokens: int) -> dict[str, float | None]:
        """Rates over the steps since the last call.

        Args:
          step: the step just finished.
          tokens: tokens processed by all devices since the last call.

        Returns:
          {"tokens_per_s", "step_time_s", "mfu" (a fraction; None without a known peak),
          "eta_s" (seconds to `total_steps` at this pace)}.
        """
        steps = step - self._step
        if steps <= 0:
            raise ValueError(f"step={step}; expected a step after the last one ({self._step})")
        now = time.perf_counter()
        elapsed = now - self._time
        self._step, self._time = step, now
        tokens_per_s = tokens / elapsed
        step_time_s = elapsed / steps
        mfu = None
        if self.peak_flops is not None:
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.num_devices)
        return {
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time_s,
            "mfu": mfu,
            "eta_s": max(self.total_steps - step, 0) * step_time_s,
        }


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
    """One line such as `step 120/1000 | loss 2.3456 | lr 3.00e-04 | grad_norm 1.234 |
    12,345 tok/s | 412.3 ms/step | data wait 0.1% | MFU 41.2% | ETA 0:12:34`. Entries
    missing from `metrics` (or None) are left out; the keys are those of `Throughput.update`
    plus loss, lr, grad_norm, data_wait_frac and, when distilling, kd, ce and the held-out
    perplexities, and when pruning, sparsity."""
    formats = (
        ("loss", lambda v: f"loss {v:.4f}"),
        ("kd", lambda v: f"kd {v:.4f}"),
        ("ce", lambda v: f"ce {v:.4f}"),
        ("eval_ppl", lambda v: f"eval ppl {v:.2f}"),
        ("teacher_eval_ppl", lambda v: f"teacher ppl {v:.2f}"),
        ("sparsity", lambda v: f"sparsity {100 * v:.1f}%"),
        ("lr", lambda v: f"lr {v:.2e}"),
        ("grad_norm", lambda v: f"grad_norm {v:.3f}"),
        ("tokens_per_s", lambda v: f"{v:,.0f} tok/s"),
        ("step_time_s", lambda v: f"{1e3 * v:,.1f} ms/step"),
        ("data_wait_frac", lambda v: f"data wait {100 * v:.1f}%"),
        ("mfu", lambda v: f"MFU {100 * v:.1f}%"),
        ("eta_s", lambda v: f"ETA {_hms(v)}"),
    )
    parts = [f"step {step}/{total_steps}"]
    parts += [fmt(float(metrics[k])) for k, fmt in formats if metrics.get(k) is not None]
    return " | ".join(parts)


def _scalar(name: str, value: Any) -> Any:
    """A JSON value: jax/numpy scalars become Python numbers."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    array = np.asarray(jax.device_get(value))
    if array.ndim == 0:
        # jnp.issubdtype, unlike NumPy's, knows bfloat16 is a float.
        for kind, convert in ((jnp.bool_, bool), (jnp.integer, int), (jnp.floating, float)):
            if jnp.issubdtype(array.dtype, kind):
                return convert(array)
    raise ValueError(
        f"metric {name!r} is {type(value).__name__} with shape {array.shape} and dtype "
        f"{array.dtype}; expected a numeric scalar"
    )


class MetricsWriter:
    """Writes metrics to `<workdir>/metrics.jsonl` (one JSON object a line, with
    "step") and to TensorBoard event files in `<workdir>/tensorboard/`.

    Only process 0 writes; on the others, and with `enabled=False`, every call does
    nothing. A resumed run appends, so a step may appear twice: the later line wins.
    Non-finite floats are written as JSON's common extension `NaN` / `Infinity`.
    """

    def __init__(self, workdir, *, enabled: bool = True):
        self._file = None
        self._tensorboard = None
        if not enabled or jax.process_index() != 0:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._file = (workdir / "metrics.jsonl").open("a")
        # Event files are named by the second and host and opened for writing, so a second
        # writer within the same second would erase the first's file without a suffix.
        self._tensorboard = SummaryWriter(
            logdir=str(workdir / "tensorboard"), filename_suffix=f".{time.time_ns()}"
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `metrics` (numeric scalars; strings and None go to the JSONL only)."""
        if self._file is None:
            return
        if "step" in metrics:
            raise ValueError("metrics may not contain 'step'; it is passed separately")
        record = {"step": int(step)} | {k: _scalar(k, v) for k, v in metrics.items()}
        self._file.write(json.dumps(record) + "\n")
        # Flushed per line so a crashed or preempted run keeps everything it logged.
        self._file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()
            self._file = self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Where a run's wall time goes besides its training steps (the `train_s` rest).
LOST_TIME = ("startup", "compile", "data_wait", "checkpoint", "eval", "generation")


class TimeAccount:
    """Where a run's wall time goes: seconds of each kind in LOST_TIME (start-up: checks,
    opening the data, loading models and restoring the checkpoint; the first step, which
    compiles; waiting for a batch; blocking on a checkpoint save; evaluation;
    on-policy generation) and the rest, training steps. Kept per logged interval
    (`interval`) and over the run (`summary`)."""

    def __init__(self):
        self.started = self._since = time.perf_counter()
        self.total = dict.fromkeys(LOST_TIME, 0.0)
        self.current = dict.fromkeys(LOST_TIME, 0.0)

    def add(self, kind: str, seconds: float) -> None:
        self.total[kind] += seconds
        self.current[kind] += seconds

    def timed(self, kind: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its wall time counted as `kind`."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(kind, time.perf_counter() - start)

    def interval(self) -> dict[str, float]:
        """Since the last call: `<kind>_s` seconds of each kind that took any, and
        `data_wait_frac`, the share of the interval spent waiting for data."""
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        out = {f"{k}_s": v for k, v in self.current.items() if v > 0}
        out["data_wait_frac"] = self.current["data_wait"] / elapsed
        self._since = now
        self.current = dict.fromkeys(LOST_TIME, 0.0)
        return out

    def summary(self) -> dict[str, float]:
        """Over the run so far: `wall_s`, `train_s` (the rest), `goodput` (train_s /
        wall_s), and `<kind>_s` with `<kind>_frac` for each kind."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        lost = sum(self.total.values())
        out = {"wall_s": wall, "train_s": wall - lost, "goodput": (wall - lost) / wall}
        for kind, seconds in self.total.items():
            out[f"{kind}_s"] = seconds
            out[f"{kind}_frac"] = seconds / wall
        return out


def summary_line(summary: Mapping[str, float]) -> str:
    """`time: 93.1% training steps (goodput) | compile 4.2% | data wait 0.3% | ...`."""
    parts = [f"time: {100 * summary['goodput']:.1f}% training steps (goodput)"]
    for kind in LOST_TIME:
        parts.append(f"{kind.replace('_', ' ')} {100 * summary[f'{kind}_frac']:.1f}%")
    return " | ".join(parts) + f" of {summary['wall_s']:.1f} s"
