r"""Distillation benchmark: step throughput (with MFU counting the teacher's forward)
and the memory of the chunked loss against the naive one.

  python -m bench.distill                   # CPU: small; accelerators: llama3.2-1b -> ~300M
  python -m bench.distill --quick           # small teacher/student on any device, 5 steps

Loss memory is XLA's compiled temp allocation for the loss and its gradient at vocab
128256 (compiled, not run, so it works on any machine). The step is compiled ahead of
time (compile_s: tracing + lowering + compilation); its time is the median of --steps
synchronised steps after --warmup (the first step counts as one).
"""

from __future__ import annotations

import argparse
import time

from bench import common

SIZES = {
    # (teacher overrides on top of the preset, student overrides, seq, batch)
    "small": (
        "tiny",
        "",
        "embed_dim=32,num_heads=4,num_kv_heads=2,head_dim=8,mlp_dim=64,num_layers=2",
        128,
        8,
    ),
    "1b": (
        "llama3.2-1b",
        "",
        "embed_dim=1024,num_layers=12,num_heads=16,num_kv_heads=4,head_dim=64,mlp_dim=4096",
        2048,
        8,
    ),
}


def loss_memory(vocab: int = 128256, batch: int = 2, seq: int = 2048, width: int = 256) -> dict:
    import jax
    import jax.numpy as jnp

    from llama_jax.nn import DistillLossConfig, chunked_distill_loss

    cfg = DistillLossConfig(kind="forward_kl", temperature=2.0, alpha=0.5)
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (
        spec(batch, seq, width),
        spec(width, vocab),
        spec(batch, seq, width),
        spec(width, vocab),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        spec(batch, seq),
    )

    def chunked(hs, ws, ht, wt, targets, mask, chunk):
        out = chunked_distill_loss(
            hs, lambda h: h @ ws, ht, lambda h: h @ wt, targets, mask, cfg, chunk=chunk
        )
        return out["loss_sum"] / out["count"]

    def naive(hs, ws, ht, wt, targets, mask):
        s = jax.nn.log_softmax((hs @ ws) / 2.0, axis=-1)
        t = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ wt) / 2.0, axis=-1)
        kd = jnp.sum(jnp.exp(t) * (t - s), axis=-1) * 4.0
        ce = -jnp.take_along_axis(jax.nn.log_softmax(hs @ ws, axis=-1), targets[..., None], -1)
        return jnp.sum((0.5 * kd + 0.5 * ce[..., 0]) * mask) / jnp.sum(mask)

    rows = []
    for name, fn in (
        ("naive", naive),
        ("chunked 512", lambda *a: chunked(*a, 512)),
        ("chunked 128", lambda *a: chunked(*a, 128)),
    ):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        rows.append(dict(loss=name, temp_gb=None if temp is None else common.gb(temp)))
    return dict(vocab=vocab, batch=batch, seq=seq, width=width, rows=rows)


def step_throughput(size: str, steps: int, warmup: int = 2) -> dict:
    import jax
    from flax import nnx

    from llama_jax import distill, sharding, train
    from llama_jax.config import get_preset
    from llama_jax.nn import DistillLossConfig, Llama
    from llama_jax.train import ModelSpec, OptimizerConfig, apply_overrides

    preset, teacher_over, student_over, seq, batch = SIZES[size]
    teacher_config = apply_overrides(get_preset(preset), teacher_over)
    student_config = apply_overrides(teacher_config, student_over)
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = "float32" if on_cpu else "bfloat16"
    model_spec = ModelSpec(
        dtype=dtype,
        param_dtype="float32",
        scan_layers=True,
        remat_policy="none" if on_cpu else "dots_no_batch",
        attention_impl="auto",
    )
    mesh = sharding.create_mesh()
    rules = sharding.DEFAULT_RULES
    make_student, s_graphdef, s_abstract = train.abstract_model(
        student_config, model_spec, mesh, rules
    )
    teacher_kwargs = dict(model_spec.kwargs(), param_dtype=jax.numpy.dtype(dtype))
    teacher = sharding.create_sharded(
        lambda: Llama(teacher_config, rngs=nnx.Rngs(1), **teacher_kwargs), mesh, rules
    )
    t_graphdef, t_state = nnx.split(teacher)
    t_params = nnx.to_pure_dict(t_state)
    opt = OptimizerConfig(total_steps=steps + 10, warmup_steps=2)
    tx = train.make_optimizer(opt)
    params = nnx.to_pure_dict(nnx.split(sharding.create_sharded(make_student, mesh, rules))[1])
    state, shardings = train.init_state(params, tx, mesh)
    batch_sh = train.batch_sharding(mesh, rules, (batch, seq))
    step_fn = train.jit_train_step(
        distill.make_distill_step(
            s_graphdef,
            t_graphdef,
            tx,
            train.learning_rate_schedule(opt),
            DistillLossConfig(temperature=2.0, alpha=0.5),
            alpha_fn=distill.linear_schedule(0.5, -1, steps),
            temperature_fn=distill.linear_schedule(2.0, -1, steps),
            loss_chunk=512,
        ),
        shardings,
        batch_sh,
        jax.tree.map(lambda x: x.sharding, t_params),
    )
    rng = jax.random.PRNGKey(0)
    tokens = jax.random.randint(rng, (batch, seq), 0, teacher_config.vocab_size)
    ones = jax.numpy.ones((batch, seq), jax.numpy.int32)
    data = jax.device_put(
        dict(
            tokens=tokens, targets=jax.numpy.roll(tokens, -1, 1), segment_ids=ones, loss_mask=ones
        ),
        batch_sh,
    )
    start = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):
        compiled = step_fn.lower(state, data, t_params).compile()
    compile_s = time.perf_counter() - start

    def step():
        nonlocal state
        state, m = compiled(state, data, t_params)
        return state, m

    start = time.perf_counter()
    jax.block_until_ready(step())
    first_step_s = time.perf_counter() - start
    timed = common.time_calls(step, warmup=warmup - 1, repeats=steps)
    step_s = timed["median"]
    flops = train.matmul_flops_per_token(student_config, seq) + (
        train.matmul_flops_per_token(teacher_config, seq) / 3
    )
    tokens_per_s = batch * seq / step_s
    peak = train.peak_flops_per_device()
    return dict(
        size=size,
        teacher_params=teacher_config.num_params(),
        student_params=student_config.num_params(),
        seq=seq,
        batch=batch,
        dtype=dtype,
        compile_s=round(compile_s, 2),
        first_step_s=round(first_step_s, 2),
        step_ms_median=round(1000 * step_s, 2),
        step_ms_min=round(1000 * timed["min"], 2),
        step_ms_max=round(1000 * timed["max"], 2),
        tokens_per_s=round(tokens_per_s, 1),
        tflops_per_s=round(flops * tokens_per_s / 1e12, 4),
        mfu=None if not peak else round(flops * tokens_per_s / peak, 4),
        steps_timed=steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", choices=["auto", *sorted(SIZES)])
    parser.add_argument("--quick", action="store_true", help="the small size, 5 timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, >= 1")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is always a warm-up)")
    facts = common.device_facts()
    reference = "small" if facts["platform"] == "cpu" else "1b"
    if args.quick:
        args.size, args.steps = "small", min(args.steps, 5)
    size = reference if args.size == "auto" else args.size
    memory = loss_memory()
    print(common.table(memory["rows"], ["loss", "temp_gb"]))
    speed = step_throughput(size, args.steps, args.warmup)
    print(common.table([speed], list(speed)))
    targets = [
        common.target(
            "distill_mfu_1b",
            "distillation step MFU (student training + teacher forward), llama3.2-1b "
            "teacher -> 314M student, seq 2048, batch 8, on an H100",
            speed["mfu"],
            0.45,
            ">=",
            "fraction of peak",
            size == "1b" and facts["platform"] == "gpu",
        )
    ]
    common.print_targets(targets)
    path = common.write_result(
        "distill",
        facts["device"],
        dict(
            facts=facts,
            loss_memory=memory,
            step=speed,
            targets=targets,
            units=dict(
                temp_gb="GB (1e9 bytes)",
                tokens_per_s="tokens/s",
                step_ms_median="ms",
                compile_s="s",
                first_step_s="s",
                mfu="fraction of the device's dense bf16 peak",
            ),
        ),
        quick=args.quick and size != reference,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
