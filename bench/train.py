r"""Training benchmark: throughput, step time, compile time and MFU of the jitted train
step, against transformers' LlamaForCausalLM on PyTorch in the same run.

  python -m bench.train                      # CPU: small model; accelerators: llama3.2-1b
  python -m bench.train --quick              # the small model on any device
  python -m bench.train --peer_compile       # the peer under torch.compile
  python -m bench.train --profile=/tmp/prof  # also trace 3 steps (TensorBoard, Perfetto)

The step is the one `launch.train` runs (`train_step.make_train_step` jitted by
`train_step.jit_train_step`, state donated) with the settings of configs/llama3_2_1b.py:
bf16 compute over float32 master weights, scanned layers, its remat policy, attention
'auto' (cuDNN on GPU), AdamW with clipping, chunked float32 cross-entropy. The 1b size is
the llama3.2-1b shape (1.24B parameters, vocab 128256) at seq 2048, batch 8, on one
device; the small size shrinks that architecture so it runs in seconds on a CPU, in
float32 (XLA's CPU has no fast bf16 matmul).

Compile time is tracing + lowering + XLA compilation of the step (ahead of time); the
step time is the median of --steps synchronised steps after --warmup steps (the first
step counts as one). The batch carries segment ids, as every training batch does, so
on GPU cuDNN attention runs with the segment mask. MFU counts 6 x parameters + causal
attention FLOPs per token (`train_step.matmul_flops_per_token`) against the device's dense
bf16 peak; on a CPU it is n/a unless --peak_tflops is given. JAX and the peer run one
after the other, each in its own process (JAX holds most of an accelerator's memory
until it exits), on random tokens of the same shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from bench import common

# size -> (preset or None for common.small_config(), seq, batch)
SIZES = {"small": (None, 128, 8), "1b": ("llama3.2-1b", 2048, 8)}


def _model_config(size: str):
    from llama_jax.config import get_preset

    preset = SIZES[size][0]
    return common.small_config() if preset is None else get_preset(preset)


def jax_worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs.llama3_2_1b import get_config
    from llama_jax import nn, sharding, train
    from llama_jax.train import RunConfig

    facts = common.device_facts()
    on_cpu = facts["platform"] == "cpu"
    size = spec["size"] if spec["size"] != "auto" else ("small" if on_cpu else "1b")
    model_config = _model_config(size)
    _, seq, batch = SIZES[size]
    cfg = get_config()
    cfg.model.dtype = (
        spec["dtype"] if spec["dtype"] != "auto" else ("float32" if on_cpu else cfg.model.dtype)
    )
    if spec["remat"]:
        cfg.model.remat_policy = spec["remat"]
    run = RunConfig.of(cfg)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    rules = run.mesh.rules_table()
    make_model, graphdef, _ = train.abstract_model(
        model_config, run.model, mesh, rules, cfg.train.seed
    )
    opt_cfg = run.train.optimizer
    tx = train.make_optimizer(opt_cfg)
    params = nnx.to_pure_dict(nnx.split(sharding.create_sharded(make_model, mesh, rules))[1])
    state, shardings = train.init_state(params, tx, mesh)
    batch_sh = train.batch_sharding(mesh, rules, (batch, seq))
    step_fn = train.jit_train_step(
        train.make_train_step(
            graphdef,
            tx,
            train.learning_rate_schedule(opt_cfg),
            loss_chunk=cfg.train.loss_chunk,
        ),
        shardings,
        batch_sh,
    )
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, model_config.vocab_size)
    ones = jnp.ones((batch, seq), jnp.int32)
    data = jax.device_put(
        dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=ones, loss_mask=ones),
        batch_sh,
    )
    if facts["compilation_cache_dir"]:
        print(f"note: compilation cache {facts['compilation_cache_dir']} may shorten compile_s")

    start = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):
        lowered = step_fn.lower(state, data)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s (tracing and lowering {lower_s:.1f} s)")

    losses = []

    def step():
        nonlocal state
        state, metrics = compiled(state, data)
        losses.append(metrics["loss"])
        return state, metrics

    # The first step counts as a warm-up.
    start = time.perf_counter()
    jax.block_until_ready(step())
    first_step_s = time.perf_counter() - start
    timed = common.time_calls(step, warmup=spec["warmup"] - 1, repeats=spec["steps"])
    mem = jax.devices()[0].memory_stats() or {}
    if spec["profile"]:
        with jax.profiler.trace(spec["profile"]):
            for _ in range(3):
                jax.block_until_ready(step())
        print(f"profile of 3 steps written under {spec['profile']}")
    return dict(
        facts=facts,
        size=size,
        model=model_config.to_dict(),
        num_params=model_config.num_params(),
        seq=seq,
        batch=batch,
        model_settings=dict(
            **{k: cfg.model[k] for k in ("dtype", "param_dtype", "scan_layers", "remat_policy")},
            attention_impl=cfg.model.attention_impl,
            attention_impl_resolved=nn.resolve_implementation(cfg.model.attention_impl),
        ),
        loss_chunk=cfg.train.loss_chunk,
        optimizer=dataclasses.asdict(opt_cfg),
        flops_per_token=train.matmul_flops_per_token(model_config, seq),
        peak_flops=common.peak_flops(facts["device_kind"], spec["peak_tflops"]),
        compile_s=compile_s,
        lower_s=lower_s,
        first_step_s=first_step_s,
        step_s=timed,
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
        peak_memory_bytes=mem.get("peak_bytes_in_use"),
    )


def _rates(res: dict, tokens_per_step: int) -> dict:
    """Throughput figures of one framework from its step times (same formula for both)."""
    step_s = res["step_s"]["median"]
    tokens_per_s = tokens_per_step / step_s
    flops = res["flops_per_token"] * tokens_per_s
    return dict(
        step_ms=round(1e3 * step_s, 2),
        step_ms_min=round(1e3 * res["step_s"]["min"], 2),
        step_ms_max=round(1e3 * res["step_s"]["max"], 2),
        tokens_per_s=round(tokens_per_s, 1),
        tflops_per_s=round(flops / 1e12, 4),
        mfu=None if not res["peak_flops"] else round(flops / res["peak_flops"], 4),
        first_step_s=round(res["first_step_s"], 2),
        loss_first=round(res["loss_first"], 4),
        loss_last=round(res["loss_last"], 4),
    )


def run_peer(args, res: dict) -> dict:
    """The transformers peer on the configuration the JAX worker resolved; a skip or a
    failure is recorded (`skipped`, `error`), not raised."""
    reason = common.peer_skip_reason(res["facts"]["platform"], args.peer)
    if reason:
        print(f"peer skipped: {reason}")
        return dict(skipped=reason)
    spec = dict(
        platform=res["facts"]["platform"],
        model=res["model"],
        batch=res["batch"],
        seq=res["seq"],
        dtype=res["model_settings"]["dtype"],
        optimizer=res["optimizer"],
        warmup=args.warmup,
        steps=args.steps,
        compile=args.peer_compile,
        remat=args.peer_remat,
    )
    try:
        peer = common.run_worker("bench.train", "peer", spec)
    except RuntimeError as e:
        print(f"peer failed: {e}")
        return dict(error=str(e)[-2000:])
    if peer["params"] != res["num_params"]:
        error = f"the peer has {peer['params']} parameters, llama_jax {res['num_params']}"
        print(f"peer not compared: {error}")
        return dict(peer, error=error)
    return dict(peer, flops_per_token=res["flops_per_token"], peak_flops=res["peak_flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", choices=["auto", *SIZES])
    parser.add_argument("--quick", action="store_true", help="the small size, 5 timed steps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--remat", default="", help="remat policy (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, >= 1")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--peer", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--peer_compile", action="store_true", help="torch.compile the peer")
    parser.add_argument(
        "--peer_remat", action="store_true", help="the peer with gradient checkpointing"
    )
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="override the peak")
    parser.add_argument("--profile", default="", help="directory for a jax.profiler trace")
    common.worker_args(parser)
    args = parser.parse_args()
    if args.worker:
        from bench import peer

        spec = json.loads(args.spec)
        common.finish_worker(args, jax_worker(spec) if args.worker == "jax" else peer.train(spec))
        return
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is always a warm-up)")
    if args.quick:
        args.size, args.steps = "small", min(args.steps, 5)

    res = common.run_worker(
        "bench.train",
        "jax",
        dict(
            size=args.size,
            dtype=args.dtype,
            remat=args.remat,
            warmup=args.warmup,
            steps=args.steps,
            peak_tflops=args.peak_tflops,
            profile=args.profile,
        ),
    )
    peer = run_peer(args, res)
    facts = res["facts"]
    tokens_per_step = res["batch"] * res["seq"]
    rows = [dict(framework="llama_jax (jax.jit)", **_rates(res, tokens_per_step))]
    ratio = None
    if "skipped" not in peer and "error" not in peer:
        label = "transformers (torch" + (".compile" if peer["compiled"] else " eager")
        label += ", checkpointing)" if peer["gradient_checkpointing"] else ")"
        rows.append(dict(framework=label, **_rates(peer, tokens_per_step)))
        ratio = round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 3)
    columns = ["framework", "step_ms", "tokens_per_s", "tflops_per_s", "mfu", "first_step_s"]
    print(
        f"{res['size']}: {res['num_params']:,} parameters, batch {res['batch']} x seq "
        f"{res['seq']}, {res['model_settings']['dtype']} compute on {facts['device']}"
    )
    print(common.table(rows, [*columns, "loss_first", "loss_last"]))
    summary = dict(
        compile_s=round(res["compile_s"], 2),
        lower_s=round(res["lower_s"], 2),
        jax_over_peer_tokens_per_s=ratio,
        peak_memory_gb=None
        if res["peak_memory_bytes"] is None
        else common.gb(res["peak_memory_bytes"]),
    )
    for k, v in summary.items():
        print(f"{k}: {common.cell(v)}")
    on_target = res["size"] == "1b" and facts["platform"] == "gpu"
    targets = [
        common.target(
            "train_mfu_1b",
            "train-step MFU at the llama3.2-1b shape (seq 2048, batch 8) on an H100",
            rows[0]["mfu"],
            0.5,
            ">=",
            "fraction of peak",
            on_target,
        ),
        common.target(
            "train_compile_1b",
            "first-step compile (trace + lower + compile) of the 1B train step",
            summary["compile_s"],
            60.0,
            "<=",
            "s",
            on_target,
        ),
    ]
    common.print_targets(targets)
    path = common.write_result(
        "train",
        facts["device"],
        dict(
            facts=facts,
            config=dict(
                size=res["size"],
                model=res["model"],
                num_params=res["num_params"],
                seq=res["seq"],
                batch=res["batch"],
                tokens_per_step=tokens_per_step,
                model_settings=res["model_settings"],
                loss_chunk=res["loss_chunk"],
                optimizer=res["optimizer"],
                warmup_steps=args.warmup,
                timed_steps=args.steps,
                flops_per_token=res["flops_per_token"],
                peak_flops=res["peak_flops"],
                peer_compile=args.peer_compile,
                peer_remat=args.peer_remat,
            ),
            rows=rows,
            summary=summary,
            targets=targets,
            jax=res,
            peer=peer,
            units=dict(
                step_ms="ms (median; min and max beside it)",
                tokens_per_s="tokens/s",
                tflops_per_s="TFLOP/s (model FLOPs)",
                mfu="fraction of the device's dense bf16 peak",
                first_step_s="s (the first call after compilation)",
                compile_s="s",
                loss="nats per token (random tokens: about ln(vocab))",
                peak_memory_gb="GB (1e9 bytes)",
            ),
        ),
        quick=args.quick and facts["platform"] != "cpu",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
