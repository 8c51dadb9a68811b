r"""Pruning benchmark: the per-step cost of the pruning transformation, and what
pruning and recovery by distillation do to held-out perplexity.

  python -m bench.prune            # the demo-sized model (minutes on a CPU)
  python -m bench.prune --quick    # a smaller model and shorter runs

Overhead: the same jitted train step with plain AdamW and with AdamW wrapped in
`prune.masked` (gradual schedule, masks recomputed every 100 steps): medians of
--steps synchronised steps each, the two alternating after two warm-up rounds so
that drift in the machine's speed hits both alike; the mask update itself is timed
on its own and amortised over its 100 steps.

Quality: a teacher is trained on the demo's corpus (Python standard library source,
SentencePiece BPE), then pruned five ways and scored on held-out files: dense; 50%
unstructured one-shot (launch.prune's path); 50% gradual during distillation from the
dense model (the recovery recipe); 2:4 one-shot; 2:4 kept during distillation.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import time

from bench import common

# (train overrides on the tiny preset, seq, batch) for the overhead measurement.
STEP_SIZES = {
    "small": (
        "embed_dim=128,num_layers=4,num_heads=4,num_kv_heads=2,head_dim=32,mlp_dim=352",
        128,
        8,
    ),
    "1b": (None, 2048, 8),
}
# (demo scale, teacher steps, recovery steps) for the quality table.
QUALITY = {"quick": ("small", 120, 40), "full": ("full", 400, 200)}


def step_overhead(size: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import compress, sharding, train
    from llama_jax.config import get_preset
    from llama_jax.train import ModelSpec, OptimizerConfig, apply_overrides

    overrides, seq, batch = STEP_SIZES[size]
    config = (
        get_preset("llama3.2-1b")
        if overrides is None
        else apply_overrides(get_preset("tiny"), overrides)
    )
    on_cpu = jax.devices()[0].platform == "cpu"
    model_spec = ModelSpec(
        dtype="float32" if on_cpu else "bfloat16",
        param_dtype="float32",
        scan_layers=True,
        remat_policy="none" if on_cpu else "dots_no_batch",
        attention_impl="auto",
    )
    mesh = sharding.create_mesh()
    rules = sharding.DEFAULT_RULES
    make_model, graphdef, abstract = train.abstract_model(config, model_spec, mesh, rules)
    opt = OptimizerConfig(total_steps=10_000, warmup_steps=2)
    prune_cfg = compress.PruneConfig(
        sparsity=0.5, schedule="gradual", start_step=0, end_step=10_000, update_every=100
    )
    batch_sh = train.batch_sharding(mesh, rules, (batch, seq))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, config.vocab_size)
    ones = jnp.ones((batch, seq), jnp.int32)
    data = jax.device_put(
        dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=ones, loss_mask=ones),
        batch_sh,
    )

    def compiled_step(tx):
        """A step function over a fresh state, compiled, and its first (untimed) call."""
        params = sharding.create_sharded(make_model, mesh, rules)
        params = nnx.to_pure_dict(nnx.split(params)[1])
        state, shardings = train.init_state(params, tx, mesh)
        step_fn = train.jit_train_step(
            train.make_train_step(graphdef, tx, train.learning_rate_schedule(opt)),
            shardings,
            batch_sh,
        )
        box = [state]
        compiled = step_fn.lower(state, data).compile()

        def step():
            box[0], m = compiled(box[0], data)
            return m

        return step, box

    out = dict(size=size, num_params=config.num_params(), seq=seq, batch=batch)
    with sharding.activation_sharding(mesh, rules):
        optimizers = {
            "dense": train.make_optimizer(opt),
            "pruned": compress.masked(train.make_optimizer(opt), prune_cfg, abstract),
        }
        steps_of = {name: compiled_step(tx) for name, tx in optimizers.items()}
        # Step 0 is a schedule point (the pruned one computes masks); later ones are not.
        for name, (step, _) in steps_of.items():
            out[f"{name}_first_step_ms"] = round(
                1000 * common.time_calls(step, warmup=0, repeats=1)["median"], 3
            )
        # Alternating single steps, so drift in the machine's speed hits both alike.
        times = {name: [] for name in steps_of}
        for i in range(steps + 2):
            order = list(steps_of) if i % 2 else list(reversed(steps_of))
            for name in order:
                t = common.time_calls(steps_of[name][0], warmup=0, repeats=1)["median"]
                if i >= 2:
                    times[name].append(t)
    for name, ts in times.items():
        out[f"{name}_step_ms"] = round(1000 * statistics.median(ts), 3)
    state = steps_of["pruned"][1][0]
    # A mask update on its own (the cond branch taken once per 100 steps).
    paths = compress.pruned_paths(prune_cfg, abstract)
    update = jax.jit(lambda p: compress.compute_masks(prune_cfg, p, paths, 1))
    t = common.time_calls(lambda: update(state.params), warmup=1, repeats=3)
    out["mask_update_ms"] = round(1000 * t["median"], 3)
    out["mask_update_sparsity"] = compress.sparsity_report(update(state.params))["sparsity"]
    amortised = out["pruned_step_ms"] + out["mask_update_ms"] / prune_cfg.update_every
    out["overhead"] = round(amortised / out["dense_step_ms"] - 1, 4)
    return out


def quality(scale: str, teacher_steps: int, recover_steps: int, workdir: str) -> dict:
    from flax import traverse_util

    from launch import demo
    from llama_jax import compress, distill, formats, sharding

    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)
    s, train_data, eval_data, tok, teacher = common.demo_teacher(scale, teacher_steps, workdir, say)

    mesh = sharding.create_mesh()
    runs = {"dense": teacher}
    for name, cfg in (
        ("50% one-shot", compress.PruneConfig(sparsity=0.5)),
        ("2:4 one-shot", compress.PruneConfig(sparsity=0.0, pattern="2:4")),
    ):
        say(f"pruning: {name}")
        out = os.path.join(workdir, re.sub(r"\W+", "_", name))
        formats.prune_dir(teacher, out, cfg, mesh=mesh, tokenizer=tok, overwrite=True)
        runs[name] = out
    for name, block in (
        (
            "50% gradual + KD",
            dict(
                sparsity=0.5,
                schedule="gradual",
                end_step=recover_steps * 6 // 10,
                update_every=max(recover_steps // 20, 1),
            ),
        ),
        ("2:4 + KD", dict(sparsity=0.5, pattern="2:4")),
    ):
        say(f"recovering: {name} ({recover_steps} steps)")
        c = demo.run_config("distill", s, train_data, tok, recover_steps, s["teacher"])
        c.model.overrides = ""
        c.model.model_dir = teacher
        c.teacher.model_dir = teacher
        c.teacher.dtype = "float32"
        c.distill.alpha = 1.0
        c.distill.temperature = 1.0
        c.train.learning_rate = 1e-3
        c.train.warmup_steps = 10
        for k, v in block.items():
            c.prune[k] = v
        out = os.path.join(workdir, re.sub(r"\W+", "_", name))
        shutil.rmtree(out, ignore_errors=True)
        distill.run(c, out)
        runs[name] = out

    say("scoring held-out perplexity")
    score = common.heldout_scorer(s, eval_data, tok, teacher)
    rows = []
    for name, path in runs.items():
        ppl, params = score(path)
        flat = traverse_util.flatten_dict(params, sep=".")
        kernels = [flat[k] for k in compress.QUANTIZED_KERNELS]
        zeros = sum(int((w == 0).sum()) for w in kernels)
        total = sum(w.size for w in kernels)
        rows.append(dict(model=name, sparsity=round(zeros / total, 4), eval_ppl=round(ppl, 3)))
    return dict(
        scale=scale,
        teacher_steps=teacher_steps,
        recover_steps=recover_steps,
        eval_tokens=score.tokens,
        rows=rows,
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, shorter runs")
    parser.add_argument("--size", default="auto", choices=["auto", *sorted(STEP_SIZES)])
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per optimizer")
    parser.add_argument("--workdir", default="", help="where the quality runs go (default: temp)")
    args = parser.parse_args()
    facts = common.device_facts()
    size = args.size
    if size == "auto":
        size = "small" if facts["platform"] == "cpu" or args.quick else "1b"
    overhead = step_overhead(size, args.steps)
    print(common.table([overhead], list(overhead)))

    workdir = args.workdir or tempfile.mkdtemp(prefix="llama_jax_bench_prune_")
    try:
        q = quality(*QUALITY["quick" if args.quick else "full"], workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(common.table(q["rows"], ["model", "sparsity", "eval_ppl"]))

    targets = [
        common.target(
            "prune_step_overhead",
            "train step with the pruning transformation (masks updated every 100 steps) "
            f"against plain AdamW, {size} model",
            overhead["overhead"],
            0.05,
            "<=",
            "fraction of the dense step",
            True,
        )
    ]
    common.print_targets(targets)
    path = common.write_result(
        "prune",
        facts["device"],
        dict(
            facts=facts,
            step=overhead,
            quality=q,
            targets=targets,
            units=dict(
                dense_step_ms="ms",
                pruned_step_ms="ms",
                mask_update_ms="ms",
                overhead="fraction",
                eval_ppl="perplexity on held-out files (nats -> exp)",
                sparsity="fraction of the block projections' weights that are zero",
            ),
        ),
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
