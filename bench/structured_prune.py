r"""Structured pruning benchmark: what slicing a teacher down (the Minitron recipe) and
distilling from the unpruned teacher gives, against the alternatives at the same
parameter count and the same number of steps, and how much faster the pruned model is.

  python -m bench.structured_prune --quick     # the demo's small teacher (minutes on a CPU)
  python -m bench.structured_prune             # the demo's teacher, longer runs
  python -m bench.structured_prune --model_dir=DIR --data=TRAIN --eval_data=HELD_OUT \
      [--tokenizer=FILE] [--targets=embed_dim=1536,mlp_dim=4096] [--steps=N]

Without --model_dir a teacher is trained on the demo's corpus (Python standard library
source, SentencePiece BPE) and pruned in width (--targets, default about half the
parameters: D and F cut). Then, all scored by held-out perplexity:

  dense teacher
  (a) structured-pruned, no recovery
  (b) structured-pruned + KD from the teacher for N steps
  (c) the same shape from random init + KD for the same N steps
  (d) magnitude-pruned (one-shot, global) to the pruned model's non-zero count, with no
      recovery and + KD for N steps with its masks kept

All KD runs share the data, learning rate, schedule and loss (alpha 1, temperature 1).
Speed: median train-step time (compiled ahead of time, --timed_steps synchronised
steps) and decode tokens/s (`bench.generate.time_generate`, greedy, EOS off) of the
dense and the pruned model, with the ratio beside the ratio of their training FLOPs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time

from bench import common

# (demo scale, teacher steps, KD steps, default width targets) per mode.
MODES = {
    "quick": ("small", 200, 60, "embed_dim=48,mlp_dim=96"),
    "full": ("full", 400, 200, "embed_dim=96,mlp_dim=192"),
}
CALIBRATION = dict(calibration_batches=8, calibration_batch_size=8)


def parse_targets(spec: str) -> dict[str, int]:
    from llama_jax import compress

    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in compress.TARGETS:
            raise SystemExit(f"--targets: {name!r} is not one of {compress.TARGETS}")
        out[name] = int(value)
    return out


def random_model_dir(config, out: str, tokenizer: str, seed: int = 1) -> str:
    """A converted model directory of `config` with random weights (case (c)'s start)."""
    from flax import nnx

    from llama_jax import formats, sharding
    from llama_jax.nn import Llama

    model = sharding.create_sharded(
        lambda: Llama(config, rngs=nnx.Rngs(seed)), sharding.create_mesh()
    )
    params = nnx.to_pure_dict(nnx.split(model)[1])
    formats.write_model_dir(
        out,
        config,
        formats.handed_out(params),
        metadata={"source": {"kind": "random", "seed": seed}, "dtype": "float32"},
        files={"tokenizer.model" if tokenizer.endswith(".model") else "tokenizer.json": tokenizer},
        overwrite=True,
    )
    return out


def step_ms(config, seq: int, batch: int, steps: int) -> dict:
    """Median time of the jitted full-training step of `config` on random tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import sharding, train
    from llama_jax.train import ModelSpec, OptimizerConfig

    on_cpu = jax.devices()[0].platform == "cpu"
    spec = ModelSpec(
        dtype="float32" if on_cpu else "bfloat16",
        remat_policy="none" if on_cpu else "dots_no_batch",
    )
    mesh, rules = sharding.create_mesh(), sharding.DEFAULT_RULES
    make_model, graphdef, _ = train.abstract_model(config, spec, mesh, rules)
    opt = OptimizerConfig(total_steps=10_000, warmup_steps=2)
    tx = train.make_optimizer(opt)
    params = nnx.to_pure_dict(nnx.split(sharding.create_sharded(make_model, mesh, rules))[1])
    state, shardings = train.init_state(params, tx, mesh)
    batch_sh = train.batch_sharding(mesh, rules, (batch, seq))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, config.vocab_size)
    ones = jnp.ones((batch, seq), jnp.int32)
    data = jax.device_put(
        dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=ones, loss_mask=ones),
        batch_sh,
    )
    step_fn = train.jit_train_step(
        train.make_train_step(graphdef, tx, train.learning_rate_schedule(opt)),
        shardings,
        batch_sh,
    )
    with sharding.activation_sharding(mesh, rules):
        compiled = step_fn.lower(state, data).compile()
    box = [state]

    def step():
        box[0], m = compiled(box[0], data)
        return m

    t = common.time_calls(step, warmup=2, repeats=steps)
    return dict(step_ms=round(1000 * t["median"], 3), times_s=t["all"])


def speed(dense, pruned, seq: int, batch: int, steps: int) -> list[dict]:
    """Train-step and decode speed of the dense and the pruned config (random weights:
    speed does not depend on their values)."""
    from bench.generate import time_generate
    from llama_jax import train

    rows = []
    for name, config in (("dense", dense), ("pruned", pruned)):
        row = dict(model=name, params=config.num_params())
        row["train_gflop_per_token"] = round(train.matmul_flops_per_token(config, seq) / 1e9, 5)
        row |= {k: v for k, v in step_ms(config, seq, batch, steps).items() if k == "step_ms"}
        model = common.decode_models(config, "float32")[0]
        t = time_generate(model, 8, 16, 64, repeats=3)
        row["decode_tok_s"] = round(t["decode_tok_s"], 1) if t["decode_tok_s"] else None
        rows.append(row)
    d, p = rows
    p["train_speedup"] = round(d["step_ms"] / p["step_ms"], 3)
    p["flops_ratio"] = round(d["train_gflop_per_token"] / p["train_gflop_per_token"], 3)
    if d["decode_tok_s"] and p["decode_tok_s"]:
        p["decode_speedup"] = round(p["decode_tok_s"] / d["decode_tok_s"], 3)
    return rows


def kd_config(s, data, fmt, tok, steps, student_dir, teacher_dir):
    """The shared KD run: the student from `student_dir`, the teacher frozen."""
    from launch import demo

    c = demo.run_config("distill", s, data, tok, steps, s["teacher"])
    c.data.format = fmt
    c.model.overrides = ""
    c.model.model_dir = student_dir
    c.teacher.model_dir = teacher_dir
    c.teacher.dtype = "float32"
    c.distill.alpha = 1.0
    c.distill.temperature = 1.0
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 10
    return c


def run(args, workdir: str) -> dict:
    from launch import demo
    from llama_jax import compress, distill, formats, nn, sharding, train, tree

    scale, teacher_steps, kd_steps, default_targets = MODES["quick" if args.quick else "full"]
    kd_steps = args.steps or kd_steps
    s = dict(demo.SCALES[scale])
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    if args.model_dir:
        teacher, train_data, eval_data = args.model_dir, args.data, args.eval_data
        tok = args.tokenizer or formats.ModelDir.open(teacher).tokenizer_path
        if not (train_data and eval_data and tok):
            raise SystemExit("--model_dir needs --data, --eval_data and a tokenizer")
    else:
        train_data, eval_data, text = demo.build_corpus(workdir, s["corpus_chars"])
        tok = demo.train_tokenizer(text, workdir, s["vocab"])
        teacher = os.path.join(workdir, "teacher")
        say(f"training the teacher ({teacher_steps} steps)")
        c = demo.run_config("train", s, train_data, tok, teacher_steps, s["teacher"])
        train.run(c, teacher)
    dense = formats.ModelDir.open(teacher).config
    fmt = "jsonl" if train_data.endswith((".jsonl", ".json")) else "text"
    spec = compress.StructuredConfig(
        **parse_targets(args.targets or default_targets),
        calibration_data=train_data,
        calibration_format=fmt,
        calibration_seq_len=s["seq_len"],
        **CALIBRATION,
    )
    mesh = sharding.create_mesh()
    runs = {"dense teacher": teacher}
    say("structured pruning")
    pruned_dir = os.path.join(workdir, "pruned")
    pruned = formats.structured_prune_dir(
        teacher, pruned_dir, spec, mesh=mesh, tokenizer=tok, overwrite=True
    )
    small = pruned.config
    runs["(a) pruned"] = pruned_dir

    prunable = [
        k for k in compress.PRUNABLE if k != "lm_head.kernel" or not dense.tie_word_embeddings
    ]
    _, abstract = nn.abstract_params(dense, mesh)
    flat = tree.flatten(abstract)
    prunable_count = sum(flat[k].size for k in prunable if k in flat)
    sparsity = (dense.num_params() - small.num_params()) / prunable_count
    include = "|".join(re.escape(k) for k in prunable if k in flat)
    say(f"magnitude pruning to {sparsity:.4f} of the projections and head")
    magnitude_dir = os.path.join(workdir, "magnitude")
    formats.prune_dir(
        teacher,
        magnitude_dir,
        compress.PruneConfig(sparsity=sparsity, include=include),
        mesh=mesh,
        tokenizer=tok,
        overwrite=True,
    )
    runs["(d) magnitude"] = magnitude_dir

    random_dir = random_model_dir(small, os.path.join(workdir, "random"), tok)
    for name, student, prune_block in (
        ("(b) pruned + KD", pruned_dir, None),
        ("(c) random init + KD", random_dir, None),
        ("(d) magnitude + KD", teacher, dict(sparsity=sparsity, include=include)),
    ):
        say(f"{name} ({kd_steps} steps)")
        c = kd_config(s, train_data, fmt, tok, kd_steps, student, teacher)
        for k, v in (prune_block or {}).items():
            c.prune[k] = v
        out = os.path.join(workdir, re.sub(r"\W+", "_", name).strip("_"))
        shutil.rmtree(out, ignore_errors=True)
        distill.run(c, out)
        runs[name] = out

    say("scoring held-out perplexity")
    ev = demo.run_config("train", s, eval_data, tok, 1, s["teacher"])
    ev.data.format = "jsonl" if eval_data.endswith((".jsonl", ".json")) else "text"
    setup = train.setup(ev, dense)
    batches = [next(setup.iterator) for _ in range(8)]
    rows = []
    for name, path in runs.items():
        model_dir = formats.ModelDir.open(path)
        config = model_dir.config
        graphdef, abstract = model_dir.abstract(setup.mesh, setup.rules)
        params = model_dir.load_params(abstract)
        nonzero = sum(int((v != 0).sum()) for v in tree.flatten(params).values())
        ppl = distill.heldout_perplexity(nn.make_eval_step(graphdef, 64), params, batches)
        rows.append(
            dict(
                model=name,
                params=config.num_params(),
                nonzero=nonzero,
                kd_steps=kd_steps if "KD" in name else 0,
                eval_ppl=round(ppl, 3),
            )
        )
        del params
    say("timing the dense and the pruned model")
    speed_rows = speed(dense, small, s["seq_len"], s["batch"], args.timed_steps)
    by = {r["model"]: r["eval_ppl"] for r in rows}
    return dict(
        scale=None if args.model_dir else scale,
        teacher=teacher if args.model_dir else f"demo {scale}, {teacher_steps} steps",
        teacher_config=dense.to_dict(),
        pruned_config=small.to_dict(),
        targets=spec.targets(),
        kd_steps=kd_steps,
        sparsity_of_d=round(sparsity, 6),
        eval_tokens=sum(int(b["loss_mask"].sum()) for b in batches),
        rows=rows,
        speed=speed_rows,
        ordering_holds=by["(b) pruned + KD"]
        < min(by["(c) random init + KD"], by["(d) magnitude + KD"]),
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small demo teacher, short runs")
    parser.add_argument("--model_dir", default="", help="a teacher model directory (any kind)")
    parser.add_argument("--data", default="", help="with --model_dir: KD and calibration data")
    parser.add_argument("--eval_data", default="", help="with --model_dir: held-out data")
    parser.add_argument("--tokenizer", default="", help="default: the teacher's")
    parser.add_argument("--targets", default="", help="e.g. embed_dim=96,mlp_dim=192")
    parser.add_argument("--steps", type=int, default=0, help="KD steps (default per mode)")
    parser.add_argument("--timed_steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--workdir", default="", help="where the runs go (default: temp)")
    args = parser.parse_args()
    facts = common.device_facts()
    workdir = args.workdir or tempfile.mkdtemp(prefix="llama_jax_bench_structured_")
    try:
        result = run(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(common.table(result["rows"], ["model", "params", "nonzero", "kd_steps", "eval_ppl"]))
    print(
        common.table(
            result["speed"],
            [
                "model",
                "params",
                "train_gflop_per_token",
                "step_ms",
                "train_speedup",
                "flops_ratio",
                "decode_tok_s",
                "decode_speedup",
            ],
        )
    )
    print(f"(b) beats (c) and (d) at {result['kd_steps']} steps: {result['ordering_holds']}")
    path = common.write_result(
        "structured_prune",
        facts["device"],
        dict(
            facts=facts,
            **result,
            units=dict(
                eval_ppl="perplexity on held-out data (exp of the mean token loss)",
                nonzero="parameters that are not exactly zero",
                step_ms="ms, median of synchronised train steps",
                train_gflop_per_token="GFLOP per trained token (matmuls and attention)",
                decode_tok_s="tokens/s, batch 8, greedy",
            ),
        ),
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
