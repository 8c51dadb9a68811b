r"""Teacher logit cache benchmark: bytes per token on disk, the writer's throughput, and
the largest error of a stored log-probability against the teacher's float32 softmax.

  python -m bench.teacher_logits           # CPU: small; accelerators: llama3.2-1b
  python -m bench.teacher_logits --quick   # the small teacher on any device, 4 steps

The teacher has random weights and the data random token rows; the cache keeps k = 64
tokens per position (and reports the layout's size at k = 8). Bytes per token count
every shard file (headers and per-row checksums included) over the tokens they hold.
Tokens per second is the writer's own figure: the teacher's forward pass, top-k,
packing and shard writing over all devices, from the end of the first (compiling) step.

Distillation from the cache (skipped with --no_quality): the demo's teacher is trained
on its corpus, caches of k = 64 and k = 8 are written for the student's run, and the
same 2-layer student is distilled (temperature 1) from the live teacher and from each
cache for the same steps. Reported: held-out perplexity, and step throughput (tokens/s
after the compiling step, the median of the logged intervals) with the ratio to the
live teacher's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import common

SIZES = {
    # (preset, overrides, seq, batch): the small teacher keeps LLaMA 3's vocabulary, so
    # its records have the ids' real width.
    "small": ("tiny", "vocab_size=128256", 128, 8),
    "1b": ("llama3.2-1b", "", 2048, 8),
}
TOP_K = 64


def _teacher_dir(root: Path, config, dtype) -> Path:
    from flax import nnx

    from llama_jax import formats, sharding
    from llama_jax.nn import Llama

    mesh = sharding.create_mesh()
    model = sharding.create_sharded(
        lambda: Llama(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)),
        mesh,
        sharding.DEFAULT_RULES,
    )
    params = nnx.to_pure_dict(nnx.split(model)[1])
    del model
    return formats.write_model_dir(
        root / "teacher", config, formats.handed_out(params), metadata={}
    )


def _config(teacher: Path, data: Path, seq: int, batch: int, steps: int, dtype: str):
    from configs.base import distill_config

    c = distill_config()
    c.teacher.model_dir = str(teacher)
    c.teacher.dtype = dtype
    c.data.update(path=str(data), format="tokens", seq_len=seq, global_batch=batch)
    c.train.steps = steps
    return c


def _max_error(cache_dir: Path, teacher: Path, rows: int = 2) -> dict:
    """The largest |stored - exact| log-probability and tail log-mass over the first
    rows of batch 0, against the teacher's float32 softmax."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llama_jax import distill, formats

    cache = distill.LogitCache(cache_dir)
    records, _ = cache.read(0, range(rows))
    ids, logp, tail = map(np.asarray, distill.decode(cache.layout, records))
    model, _ = formats.load_model(teacher)
    tokens = np.load(cache.meta["data"]["path"])
    perm = np.random.default_rng((cache.meta["data"]["seed"], 0)).permutation(len(tokens))
    batch = jnp.asarray(tokens[perm[:rows]], jnp.int32)
    logits = nnx.jit(lambda m, t: m(t))(model, batch)
    log_p = np.array(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    at_ids = np.take_along_axis(log_p, ids, -1)
    np.put_along_axis(log_p, ids, -np.inf, -1)
    want_tail = np.logaddexp.reduce(log_p.astype(np.float64), axis=-1)
    return dict(
        max_logprob_error=float(np.max(np.abs(logp - at_ids))),
        max_tail_error=float(np.max(np.abs(tail - want_tail))),
        positions_checked=int(ids.shape[0] * ids.shape[1]),
    )


def run(size: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import distill
    from llama_jax.config import get_preset
    from llama_jax.distill import Layout
    from llama_jax.train import apply_overrides

    preset, overrides, seq, batch = SIZES[size]
    config = apply_overrides(get_preset(preset), overrides)
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = _teacher_dir(root, config, jnp.dtype(dtype))
        rng = np.random.default_rng(0)
        data = root / "rows.npy"
        np.save(data, rng.integers(3, 263, (4 * batch, seq), dtype=np.int32))
        cfg = _config(teacher, data, seq, batch, steps, dtype)
        start = time.perf_counter()
        summary = distill.write_teacher_logits(cfg, root / "cache", top_k=TOP_K, log_every=steps)
        wall = time.perf_counter() - start
        shards = sorted((root / "cache" / "shards").iterdir())
        disk = sum(p.stat().st_size for p in shards)
        errors = _max_error(root / "cache", teacher)
    tokens = steps * batch * seq
    return dict(
        size=size,
        teacher_params=config.num_params(),
        vocab=config.vocab_size,
        seq=seq,
        batch=batch,
        dtype=dtype,
        steps=steps,
        top_k=TOP_K,
        record_bytes=summary["record_bytes"],
        record_bytes_k8=Layout(8, config.vocab_size).record_bytes,
        bytes_per_token=round(disk / tokens, 2),
        shard_files=len(shards),
        tokens_per_s=None if summary["tokens_per_s"] is None else round(summary["tokens_per_s"]),
        wall_s=round(wall, 2),
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in errors.items()},
    )


# (demo scale, teacher steps, student steps) of the distillation comparison.
QUALITY = {"quick": ("small", 80, 60), "full": ("full", 400, 200)}


def quality(mode: str, workdir: str) -> dict:
    import json
    import os
    import shutil
    import statistics

    from launch import demo
    from llama_jax import distill

    scale, teacher_steps, steps = QUALITY[mode]
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)
    s, train_data, eval_data, tok, teacher = common.demo_teacher(scale, teacher_steps, workdir, say)

    def config(logits_dir: str = ""):
        c = demo.run_config("distill", s, train_data, tok, steps, s["student"])
        c.teacher.model_dir = teacher
        c.teacher.dtype = "float32"
        c.teacher.logits_dir = logits_dir
        c.distill.temperature = 1.0
        c.train.log_every = max(steps // 10, 1)
        return c

    runs = {"live teacher": ""}
    for k in (64, 8):
        say(f"writing the k = {k} cache")
        cache = os.path.join(workdir, f"logits_k{k}")
        distill.write_teacher_logits(config(), cache, top_k=k)
        runs[f"cache k={k}"] = cache
    rows = []
    score = common.heldout_scorer(s, eval_data, tok, teacher)
    for name, cache in runs.items():
        say(f"distilling from the {name} ({steps} steps)")
        out = os.path.join(workdir, name.replace(" ", "_").replace("=", ""))
        shutil.rmtree(out, ignore_errors=True)
        distill.run(config(cache), out)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            logged = [json.loads(x) for x in f if x.strip()]
        rate = statistics.median(x["tokens_per_s"] for x in logged if "tokens_per_s" in x)
        ppl, _ = score(out)
        rows.append(dict(student=name, eval_ppl=round(ppl, 3), tokens_per_s=round(rate, 1)))
    live = rows[0]
    for r in rows:
        r["ppl_vs_live"] = round(r["eval_ppl"] / live["eval_ppl"] - 1, 4)
        r["speed_vs_live"] = round(r["tokens_per_s"] / live["tokens_per_s"], 3)
    return dict(mode=mode, scale=scale, steps=steps, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", choices=["auto", *sorted(SIZES)])
    parser.add_argument("--quick", action="store_true", help="the small size, 4 steps")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--no_quality", action="store_true", help="skip the distillation runs")
    args = parser.parse_args()
    facts = common.device_facts()
    reference = "small" if facts["platform"] == "cpu" else "1b"
    if args.quick:
        args.size, args.steps = "small", min(args.steps, 4)
    size = reference if args.size == "auto" else args.size
    row = run(size, args.steps)
    print(common.table([row], list(row)))
    q = None
    if not args.no_quality:
        with tempfile.TemporaryDirectory(prefix="llama_jax_bench_logits_") as workdir:
            q = quality("quick" if args.quick else "full", workdir)
        print(common.table(q["rows"], list(q["rows"][0])))
    targets = [
        common.target(
            "logit_cache_bytes_per_token_k64",
            "teacher logit cache on disk at k = 64, vocabulary 128256",
            row["bytes_per_token"],
            300,
            "<=",
            "bytes/token",
            row["vocab"] == 128256,
        ),
        common.target(
            "logit_cache_k64_student_ppl",
            "held-out perplexity of the student distilled from the k = 64 cache, relative "
            "to the live teacher's student",
            None if q is None else q["rows"][1]["ppl_vs_live"],
            0.01,
            "<=",
            "fraction",
            q is not None,
        ),
        common.target(
            "logit_cache_max_logprob_error",
            "largest error of a stored log-probability",
            row["max_logprob_error"],
            1e-2,
            "<=",
            "nats",
            True,
        ),
    ]
    common.print_targets(targets)
    path = common.write_result(
        "teacher_logits",
        facts["device"],
        dict(
            facts=facts,
            cache=row,
            distillation=q,
            targets=targets,
            units=dict(
                record_bytes="bytes/position",
                bytes_per_token="bytes on disk / cached token",
                tokens_per_s="teacher tokens/s (all devices)",
                wall_s="s (loading, compiling and writing included)",
                max_logprob_error="nats",
                max_tail_error="nats",
            ),
        ),
        quick=args.quick and size != reference,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
