r"""The GPU run: the GPU-only tests, then the training, int8, distillation and decode
benchmarks at the llama3.2-1b shape, in a fixed wall-time budget (8 minutes by default),
on a machine with CUDA JAX, flax, optax, orbax, PyTorch and transformers installed, run
from the repository root without installing the project.

  python3 -m bench.run_gpu                      # what `make bench-gpu` runs
  python3 -m bench.run_gpu --wheels=.whl        # first install these wheels (make gpu-wheels)
  BENCH_OUT=DIR python3 -m bench.run_gpu        # also copy results, charts and the log to DIR
  python3 -m bench.run_gpu --quick              # the same plumbing on the CPU, --quick benchmarks

The wheels go into a temporary directory that is put on PYTHONPATH after the repository
root. Each step is a separate process group with a deadline: a step may use its own
share of the budget plus whatever the steps before it left unused, never the shares of
the steps after it, and is killed (with every process it started) at its deadline. A
failed step is recorded and the run goes on; the exit status is non-zero if any step
failed. A benchmark step counts as passed when it exits 0 and has written its
bench/results/<name>-<device>.json; the test step, when no test failed and (on a GPU) none
was skipped. Benchmarks run with fewer timed steps and repeats than their defaults to
fit the budget (see STEPS); compile times and median step times are measured as usual.

With BENCH_OUT set, DIR receives the result JSON files this run wrote, their charts in
charts.tar, the combined output as bench-gpu.log and the step table as summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import common

GPU_TESTS = [
    "tests/test_model.py::test_cudnn_attention_matches_reference",
    "tests/test_gpu.py",
]

_DEVICE_CHECK = """
import json, os, sys
from bench import common
try:
    facts = common.device_facts()
except Exception as e:
    platforms = os.environ.get("JAX_PLATFORMS")
    sys.exit(f"JAX found no device (JAX_PLATFORMS={platforms}): {type(e).__name__}: {e}")
print(json.dumps(dict(facts, versions=common.versions())))
if sys.argv[1] == "gpu" and facts["platform"] != "gpu":
    sys.exit(f"JAX runs on {facts['platform']!r}, not a GPU")
"""

# name, share of the budget (s), the Python arguments, flags on a GPU, the benchmark whose
# result file must appear (None: not a benchmark). The shares add up to 475 s: with the
# last step's KILL_GRACE_S, the run ends within 8 minutes.
# Decode goes last: its PyTorch peer compiles its step (CUDA graphs), the least
# predictable time, and the last step inherits every second the others left.
STEPS = [
    ("wheels", 5, None, [], None),
    ("device", 15, ["-c", _DEVICE_CHECK], [], None),
    ("tests", 45, ["-m", "pytest", *GPU_TESTS], [], None),
    ("train", 110, ["-m", "bench.train"], ["--steps=5"], "train"),
    ("quant", 75, ["-m", "bench.quant"], ["--repeats=3"], "quant"),
    ("distill", 80, ["-m", "bench.distill"], ["--steps=5"], "distill"),
    ("generate", 145, ["-m", "bench.generate"], ["--new_tokens=128", "--repeats=3"], "generate"),
]
BUDGET_S = sum(s[1] for s in STEPS)
# After SIGTERM, how long a step's processes get before SIGKILL.
KILL_GRACE_S = 5


class Log:
    """Prints and appends to the combined log file."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("w", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")


def run_step(cmd: list[str], env: dict, timeout_s: float, log: Log) -> tuple[int | None, float]:
    """Runs cmd in a new process group, streaming its output to the log. Returns (exit
    status, or None when it was killed at the deadline; seconds). Kills the group at the
    end either way, so no worker it started can outlive it and hold the GPU."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=common.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        rc = None
        log(f"!! deadline reached after {time.perf_counter() - start:.0f} s: stopping the step")
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    return rc, time.perf_counter() - start


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def install_wheels(wheel_dir: Path, target: Path, env: dict, timeout_s: float, log: Log):
    """pip-installs every wheel in wheel_dir into target, offline. Returns (status, note)."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return "ok", f"no wheels in {wheel_dir}"
    log("wheels: " + " ".join(w.name for w in wheels))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
    rc, _ = run_step(cmd + [str(w) for w in wheels], env, timeout_s, log)
    if rc != 0:
        return "fail", "pip install " + ("timed out" if rc is None else f"exited {rc}")
    return "ok", f"{len(wheels)} wheels into {target}"


def test_status(rc: int | None, junit: Path, on_gpu: bool) -> tuple[str, str]:
    """pytest's outcome: on a GPU a skipped test is a failure (JAX did not see the GPU)."""
    counts = {}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    note = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no report"
    if rc is None:
        return "timeout", note
    if rc != 0:
        return "fail", f"pytest exited {rc}; {note}"
    if on_gpu and counts.get("skipped"):
        return "fail", f"{note}: GPU tests must not skip on a GPU"
    return "ok", note


def new_result(name: str, since: float) -> Path | None:
    """The newest bench/results/<name>-*.json written at or after `since` (epoch s)."""
    found = [p for p in common.RESULTS.glob(f"{name}-*.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def collect(out: Path, results: list[Path], summary: list[dict], log: Log) -> None:
    """Copies the result files to out, their charts into out/charts.tar, and the summary."""
    out.mkdir(parents=True, exist_ok=True)
    charts = [p.with_suffix(".png") for p in results if p.with_suffix(".png").exists()]
    for p in results:
        (out / p.name).write_bytes(p.read_bytes())
    if charts:
        with tarfile.open(out / "charts.tar", "w") as tar:
            for p in charts:
                tar.add(p, arcname=p.name)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"copied {len(results)} result files and {len(charts)} charts (charts.tar) to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default="", help="directory of wheels to install first")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check the plumbing on any machine: JAX on the CPU, each benchmark's --quick "
        "(writes bench/results/ as `make bench` does); skipped tests pass",
    )
    parser.add_argument(
        "--budget_s", type=float, default=BUDGET_S, help="total wall time, shared pro rata"
    )
    parser.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", ""), help="or $BENCH_OUT")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    unknown = only - {s[0] for s in STEPS}
    if unknown:
        parser.error(f"--only: unknown steps {sorted(unknown)}; known: {[s[0] for s in STEPS]}")

    t0 = time.perf_counter()
    wall0 = time.time()
    on_gpu = not args.quick
    tmp = Path(tempfile.mkdtemp(prefix="llama_jax_bench_gpu_"))
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    log = Log((out or tmp) / "bench-gpu.log")
    site = tmp / "site"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in (str(common.REPO), str(site), os.environ.get("PYTHONPATH")) if p
        ),
        PYTHONUNBUFFERED="1",
        # Explicit, so neither the tests' CPU default nor a missing GPU sends the
        # benchmarks to the CPU (where they would write the CPU results).
        JAX_PLATFORMS="cuda" if on_gpu else "cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    scale = args.budget_s / BUDGET_S
    mode = "quick plumbing check on the CPU" if args.quick else "GPU run"
    log(f"bench-gpu: {mode}, budget {args.budget_s:.0f} s, python {sys.executable}")
    log(f"JAX_PLATFORMS={env['JAX_PLATFORMS']} PYTHONPATH={env['PYTHONPATH']}")

    summary, results = [], []
    deadline = 0.0
    for name, share, module, gpu_flags, bench in STEPS:
        budget = share * scale
        deadline += budget
        if only and name not in only:
            continue
        timeout_s = deadline - (time.perf_counter() - t0)
        row = dict(step=name, status="", seconds=0.0, timeout_s=round(max(timeout_s, 0), 1))
        summary.append(row)
        if timeout_s < 1:
            row.update(status="no time", note="earlier steps used this step's share")
            log(f"\n== {name}: skipped, no time left")
            continue
        log(f"\n== {name} (deadline in {timeout_s:.0f} s)")
        start = time.perf_counter()
        if name == "wheels":
            if not args.wheels:
                row.update(status="ok", note="no --wheels given")
                continue
            status, note = install_wheels(Path(args.wheels), site, env, timeout_s, log)
            row.update(status=status, note=note, seconds=round(time.perf_counter() - start, 1))
            continue
        cmd = [sys.executable, *module]
        if name == "device":
            cmd.append("gpu" if on_gpu else "cpu")
        elif name == "tests":
            junit = tmp / "tests.xml"
            cmd += ["-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        else:
            cmd += ["--quick"] if args.quick else gpu_flags
        shown = [*cmd[:2], "<device check>", cmd[-1]] if name == "device" else cmd
        log("$ " + " ".join(shown))
        since = time.time() - 1
        rc, seconds = run_step(cmd, env, timeout_s, log)
        row["seconds"] = round(seconds, 1)
        if name == "tests":
            status, note = test_status(rc, junit, on_gpu)
        elif rc is None:
            status, note = "timeout", f"killed after {seconds:.0f} s"
        elif rc != 0:
            status, note = "fail", f"exited {rc}"
        elif bench:
            path = new_result(bench, since)
            status, note = ("ok", str(path.relative_to(common.REPO))) if path else ("fail", "")
            note = note or f"exited 0 but wrote no bench/results/{bench}-*.json"
            if path:
                results.append(path)
        else:
            status, note = "ok", ""
        row.update(status=status, note=note)

    total = time.perf_counter() - t0
    failed = [r["step"] for r in summary if r["status"] != "ok"]
    log("\n== summary")
    log(common.table(summary, ["step", "status", "seconds", "timeout_s", "note"]))
    log(f"total {total:.0f} s of {args.budget_s:.0f} s; started {time.ctime(wall0)}")
    log(f"FAILED: {', '.join(failed)}" if failed else "all steps passed")
    if out:
        collect(out, results, summary, log)
    else:
        log(f"log: {log.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
