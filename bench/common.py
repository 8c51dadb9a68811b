"""Shared by the benchmarks: device and version facts, timing, worker processes, targets,
peak RSS of child processes, page-cache eviction, and the result files (JSON and a PNG
chart) under bench/results/."""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata, util
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).parents[1]


def device_name() -> str:
    """'cpu', or the accelerator's kind with spaces as dashes and its platform after it
    (e.g. 'nvidia-h200-gpu', 'tpu-v5p-tpu'), so results of one platform share a suffix."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return f"{dev.device_kind.lower().replace(' ', '-')}-{dev.platform}"


def device_facts() -> dict:
    """What the measurements ran on: JAX's first device, how many there are, the host."""
    import jax

    dev = jax.devices()[0]
    return dict(
        device=device_name(),
        platform=dev.platform,
        device_kind=dev.device_kind,
        device_count=jax.device_count(),
        platform_version=getattr(getattr(dev, "client", None), "platform_version", None),
        host_cpus=os.cpu_count(),
        # Other processes on a shared host slow every figure down; this says how busy.
        host_load_1min=round(os.getloadavg()[0], 2),
        # A persistent compilation cache would turn compile times into cache reads.
        compilation_cache_dir=getattr(jax.config, "jax_compilation_cache_dir", None),
    )


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind (H100 SXM: 989e12), or None
    when unknown (CPUs). The table is `llama_jax.metrics`', which training's progress
    line uses too, so MFU means the same everywhere; override_tflops replaces it."""
    if override_tflops:
        return override_tflops * 1e12
    from llama_jax import train

    return train.peak_flops_per_device(device_kind)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    """HEAD of the checkout, with '+dirty' when tracked files differ; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def command() -> str:
    """The command line that started this process, as typed: `python -m bench.train
    --quick` (sys.argv would show the module's file path instead of `-m`)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def peer_skip_reason(platform: str, mode: str) -> str | None:
    """Why the PyTorch + transformers peer will not run next to JAX on `platform`
    (--peer=`mode`: auto, on or off), or None when it will. --peer=on makes a reason
    an error."""
    if mode == "off":
        return "--peer=off"
    reason = None
    if platform not in ("cpu", "gpu"):
        reason = f"no PyTorch peer on {platform}"
    elif not all(util.find_spec(m) is not None for m in ("torch", "transformers")):
        reason = "torch and transformers are not both installed"
    if reason and mode == "on":
        raise SystemExit(f"--peer=on, but {reason}")
    return reason


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[object], object] | None = None,
) -> dict:
    """Times `fn()`: `warmup` untimed calls, then `repeats` timed ones, each ended by
    `sync(result)` (default `jax.block_until_ready`) so the device has finished.

    Returns seconds: {"median", "min", "max", "all"}.
    """
    if sync is None:
        import jax

        sync = jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return dict(
        median=statistics.median(times),
        min=min(times),
        max=max(times),
        all=[round(t, 6) for t in times],
    )


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """Device memory bandwidth measured on a jitted `x + 1` over a float32 array of
    `nbytes`: each byte is read once and written once, so a call moves 2 * nbytes.
    Median of `repeats` synchronised calls after a warm-up (which compiles).

    Returns {"bytes_per_s", "array_bytes", "seconds"}.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    touch = jax.jit(lambda a: a + 1)
    t = time_calls(lambda: touch(x), warmup=2, repeats=repeats)
    return dict(bytes_per_s=2 * (nbytes // 4) * 4 / t["median"], array_bytes=nbytes, seconds=t)


def decode_models(config, dtype: str = "bfloat16", seed: int = 0):
    """A served model on one device: random weights stored and computed in `dtype`,
    and its int8 weight-only quantization (llama_jax.quant). Returns (float, int8)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import compress, nn, sharding
    from llama_jax.nn import Llama

    dt = jnp.dtype(dtype)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(
        lambda: Llama(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(seed)),
        mesh,
        sharding.DEFAULT_RULES,
    )
    q_params = jax.jit(compress.quantize_params)(nnx.to_pure_dict(nnx.split(model)[1]))
    q_graphdef, q_abstract = nn.abstract_params(
        config, mesh, dtype=dt, **compress.model_kwargs("int8")
    )
    q_state = nnx.split(nnx.eval_shape(lambda: nnx.merge(q_graphdef, q_abstract)))[1]
    nnx.replace_by_pure_dict(q_state, q_params)
    return model, nnx.merge(q_graphdef, q_state)


def target(
    name: str,
    description: str,
    value: float | None,
    threshold: float,
    comparison: str,
    unit: str,
    applies: bool,
) -> dict:
    """A figure the performance plan sets a target for. `met` is None where the target
    was not measured here (another device or shape, or no value)."""
    if comparison not in (">=", "<="):
        raise ValueError(f"comparison={comparison!r}; expected '>=' or '<='")
    met = None
    if applies and value is not None:
        met = bool(value >= threshold if comparison == ">=" else value <= threshold)
    return dict(
        name=name,
        description=description,
        value=value,
        comparison=comparison,
        threshold=threshold,
        unit=unit,
        met=met,
    )


def print_targets(targets: list[dict]) -> None:
    rows = [
        dict(
            target=t["name"],
            value=t["value"],
            goal=f"{t['comparison']} {t['threshold']} {t['unit']}",
            met=t["met"],
        )
        for t in targets
    ]
    print(table(rows, ["target", "value", "goal", "met"]))


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Runs `cmd`; returns (wall seconds, peak RSS in bytes of that process, output).
    Raises with the output's tail if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    # ru_maxrss is in KiB on Linux.
    return wall, usage.ru_maxrss * 1024, out


def run_worker(module: str, part: str, spec: dict) -> dict:
    """Runs one measurement in its own process: `python -m module --worker=part
    --spec=JSON --out=FILE`, and returns the JSON object the worker wrote to FILE.

    A separate process gives each framework the accelerator to itself: JAX reserves
    most of the device memory when it starts and keeps it until it exits. The worker's
    output is passed through, prefixed with the part's name; on failure the error
    carries its last lines.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            module,
            f"--worker={part}",
            f"--spec={json.dumps(spec)}",
            f"--out={out}",
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            # Unbuffered, so its progress shows as it happens.
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tail: collections.deque[str] = collections.deque(maxlen=20)
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  [{part}] {line}", end="", flush=True)
        if proc.wait():
            raise RuntimeError(
                f"the {part} worker of {module} exited with status {proc.returncode}:\n"
                + "\n".join(tail)
            )
        return json.loads(out.read_text())


def worker_args(parser) -> None:
    """Adds the flags `run_worker` passes to a benchmark's worker process."""
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)


def finish_worker(args, result: dict) -> None:
    Path(args.out).write_text(json.dumps(result))


def evict(paths) -> None:
    """Drops the files' pages from the page cache, so the next read comes from disk."""
    for root in paths:
        root = Path(root)
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def result_path(name: str, device: str, quick: bool = False) -> Path:
    """bench/results/<name>-<device>.json, or <name>-<device>-quick.json for a --quick
    run smaller than the device's reference run (so it never replaces one)."""
    return RESULTS / f"{name}-{device}{'-quick' if quick else ''}.json"


def write_result(name: str, device: str, payload: dict, *, quick: bool = False) -> Path:
    """Writes the JSON result (with device, versions, the exact command and the date)
    and its PNG chart next to it. Returns the JSON's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, device, quick)
    payload = {
        "benchmark": name,
        "device": device,
        "versions": versions(),
        "git": git_revision(),
        "command": command(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    from bench import plot

    plot.save_chart(path)
    return path


def cell(v) -> str:
    return "n/a" if v is None else str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table; missing figures (None) show as 'n/a'."""
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def gb(n: float) -> float:
    return round(n / 1e9, 3)


def peak_rss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def small_config():
    """The CPU (quick) model: the llama3.2-1b architecture (tied embeddings, GQA,
    llama3 RoPE) shrunk so a train step takes well under a second on two cores."""
    from llama_jax.config import get_preset

    return get_preset("llama3.2-1b").replace(
        vocab_size=2048,
        embed_dim=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
    )


def demo_teacher(scale: str, teacher_steps: int, workdir: str, say) -> tuple:
    """The demo's corpus and tokenizer at `scale` and a teacher trained on them for
    `teacher_steps`: (scale settings, train data, eval data, tokenizer path, teacher dir)."""
    from launch import demo
    from llama_jax import train

    s = dict(demo.SCALES[scale])
    train_data, eval_data, text = demo.build_corpus(workdir, s["corpus_chars"])
    tok = demo.train_tokenizer(text, workdir, s["vocab"])
    teacher = os.path.join(workdir, "teacher")
    say(f"training the teacher ({teacher_steps} steps)")
    train.run(demo.run_config("train", s, train_data, tok, teacher_steps, s["teacher"]), teacher)
    return s, train_data, eval_data, tok, teacher


def heldout_scorer(s: dict, eval_data: str, tok: str, teacher: str, batches: int = 8):
    """score(model directory) -> (held-out perplexity, its parameters), on the first
    `batches` batches of eval_data, the same for every model scored."""
    from launch import demo
    from llama_jax import distill, formats, nn, train

    ev = demo.run_config("train", s, eval_data, tok, 1, s["teacher"])
    setup = train.setup(ev, formats.ModelDir.open(teacher).config)
    rows = [next(setup.iterator) for _ in range(batches)]

    def score(path):
        model_dir = formats.ModelDir.open(path)
        graphdef, abstract = model_dir.abstract(setup.mesh, setup.rules)
        params = model_dir.load_params(abstract)
        return distill.heldout_perplexity(nn.make_eval_step(graphdef, 64), params, rows), params

    score.tokens = sum(int(b["loss_mask"].sum()) for b in rows)
    return score
