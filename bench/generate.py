r"""Decode benchmark: prefill time, decode tokens/s and the fraction of the
memory-bandwidth bound, bf16 and int8, at batch 1 and 16, against transformers'
static-cache `generate` in the same run.

  python -m bench.generate              # CPU: small model; accelerators: llama3.2-1b
  python -m bench.generate --quick      # the small model, short lengths, on any device

Every variant runs `llama_jax.generate.generate` (one jitted prefill, then the decode
loop on the device), greedy, with EOS off so each row decodes exactly --new_tokens
tokens after a random --prompt_len-token prompt. Prefill time is the median time of
`generate` with one new token; a decode step is (median with N tokens - median with 1)
/ (N - 1). Both include what `generate` does on the host per call, as a user sees it.

The bandwidth bound of a decode step is the bytes it has to read, over the device's
copy bandwidth measured here on a large array (`common.copy_bandwidth`): every weight
it multiplies by (with a tied head, the whole embedding table; an untied input table is
read only by row and not counted) plus the keys and values of the cache slots in use,
averaged over the decode (prompt + N / 2). frac_of_bound is that time over the measured
step: 1.0 is at the bound. On a CPU the small model's weights stay in the caches, so
the fraction can pass 1 there; the bound means something for weights far larger than
the caches, as at the 1b size on an accelerator. The int8 variant is `llama_jax.quant`
(bench/quant.py has its matmuls and quality).
"""

from __future__ import annotations

import argparse
import json
import time

from bench import common

# size -> (preset or None for common.small_config(), prompt_len, new_tokens)
SIZES = {"small": (None, 32, 16), "1b": ("llama3.2-1b", 128, 256)}
BATCHES = (1, 16)
DTYPE = "bfloat16"  # of the weights and the compute; the int8 variant computes in it too


def time_generate(model, batch: int, prompt_len: int, new_tokens: int, *, repeats: int) -> dict:
    """Times `generate` on `batch` random prompts of prompt_len tokens: the first calls
    (compilation included), then medians of `repeats` calls with new_tokens and with 1
    new token (the prefill). Seconds, and decode tokens/s over the difference."""
    import numpy as np

    from llama_jax import nn

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.config.vocab_size, (batch, prompt_len)).tolist()

    def run(n):
        return nn.generate(model, prompts, max_new_tokens=n, eos_ids=[])

    start = time.perf_counter()
    outs = run(new_tokens)
    first_call_s = time.perf_counter() - start
    if any(len(o) != new_tokens for o in outs):
        raise RuntimeError(f"generate returned {[len(o) for o in outs]} tokens, not {new_tokens}")
    run(1)
    # generate returns host lists, so each call has finished on the device.
    kw = dict(warmup=0, repeats=repeats, sync=lambda _: None)
    full = common.time_calls(lambda: run(new_tokens), **kw)
    prefill = common.time_calls(lambda: run(1), **kw)
    step_s = (full["median"] - prefill["median"]) / (new_tokens - 1)
    return dict(
        first_call_s=first_call_s,
        prefill_s=prefill["median"],
        total_s=full["median"],
        decode_step_s=step_s,
        decode_tok_s=batch / step_s if step_s > 0 else None,
        end_to_end_tok_s=batch * new_tokens / full["median"],
        times=dict(total=full, prefill=prefill),
    )


def bytes_per_step(model, batch: int, cache_slots: float) -> dict:
    """Bytes a decode step must read: weights (an untied input table excepted) and
    the keys and values of `cache_slots` slots per row, all layers."""
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    c = model.config
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(model)[1]), sep=".")
    weights = sum(v.nbytes for v in flat.values())
    if not c.tie_word_embeddings:
        weights -= sum(v.nbytes for k, v in flat.items() if k.startswith("embed.embedding"))
    itemsize = jnp.dtype(model.dtype).itemsize
    kv = 2 * c.num_layers * batch * cache_slots * c.num_kv_heads * c.head_dim * itemsize
    return dict(weights=weights, kv_cache=int(kv))


def jax_worker(spec: dict) -> dict:
    facts = common.device_facts()
    on_cpu = facts["platform"] == "cpu"
    size = spec["size"] if spec["size"] != "auto" else ("small" if on_cpu else "1b")
    preset, prompt_len, new_tokens = SIZES[size]
    prompt_len = spec["prompt_len"] or prompt_len
    new_tokens = spec["new_tokens"] or new_tokens
    if preset is None:
        config = common.small_config()
    else:
        from llama_jax.config import get_preset

        config = get_preset(preset)
    copy_mib = spec["copy_mib"] or (256 if on_cpu else 2048)
    bandwidth = common.copy_bandwidth(copy_mib << 20)
    print(f"copy bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({copy_mib} MiB array)")
    models = dict(zip(("bf16", "int8"), common.decode_models(config, DTYPE), strict=True))
    rows = []
    for name, model in models.items():
        for b in spec["batches"]:
            # One variant failing (say the int8 kernel on a new GPU) must not lose the
            # others' figures: the error is recorded in its row.
            try:
                t = time_generate(model, b, prompt_len, new_tokens, repeats=spec["repeats"])
            except Exception as e:
                print(f"{name} batch {b} failed: {type(e).__name__}: {e}")
                rows.append(dict(variant=name, batch=b, error=f"{type(e).__name__}: {e}"[:2000]))
                continue
            nbytes = bytes_per_step(model, b, prompt_len + new_tokens / 2)
            rows.append(dict(variant=name, batch=b, bytes_per_step=nbytes, **t))
            tok_s = t["decode_tok_s"]
            print(f"{name} batch {b}: {'n/a' if tok_s is None else f'{tok_s:.1f}'} decode tok/s")
    return dict(
        facts=facts,
        size=size,
        model=config.to_dict(),
        num_params=config.num_params(),
        dtype=DTYPE,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        copy_bandwidth=bandwidth,
        rows=rows,
    )


def run_peer(args, res: dict) -> dict:
    """transformers' generate on the resolved configuration; a skip or a failure is
    recorded (`skipped`, `error`), not raised."""
    reason = common.peer_skip_reason(res["facts"]["platform"], args.peer)
    if reason:
        print(f"peer skipped: {reason}")
        return dict(skipped=reason)
    spec = dict(
        platform=res["facts"]["platform"],
        model=res["model"],
        dtype=res["dtype"],
        batches=list(args.batches),
        prompt_len=res["prompt_len"],
        new_tokens=res["new_tokens"],
        repeats=args.repeats,
    )
    try:
        return common.run_worker("bench.generate", "peer", spec)
    except RuntimeError as e:
        print(f"peer failed: {e}")
        return dict(error=str(e)[-2000:])


def _row(variant: str, r: dict, bandwidth: float | None) -> dict:
    out = dict(
        variant=variant,
        batch=r["batch"],
        prefill_ms=round(1e3 * r["prefill_s"], 2),
        decode_step_ms=round(1e3 * r["decode_step_s"], 3),
        decode_tok_s=None if r["decode_tok_s"] is None else round(r["decode_tok_s"], 1),
        end_to_end_tok_s=round(r["end_to_end_tok_s"], 1),
    )
    step_s = r["decode_step_s"]
    if bandwidth is not None and step_s > 0:
        nbytes = r["bytes_per_step"]["weights"] + r["bytes_per_step"]["kv_cache"]
        bound_s = nbytes / bandwidth
        out |= dict(
            mb_per_step=round(nbytes / 1e6, 2),
            bound_ms=round(1e3 * bound_s, 3),
            frac_of_bound=round(bound_s / step_s, 3),
            achieved_gb_s=round(nbytes / step_s / 1e9, 1),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="auto", choices=["auto", *SIZES])
    parser.add_argument("--quick", action="store_true", help="the small size, 3 repeats")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--prompt_len", type=int, default=0, help="default: the size's")
    parser.add_argument("--new_tokens", type=int, default=0, help="default: the size's")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--copy_mib", type=int, default=0, help="bandwidth array size")
    parser.add_argument("--peer", default="auto", choices=["auto", "on", "off"])
    common.worker_args(parser)
    args = parser.parse_args()
    if args.worker:
        from bench import peer

        spec = json.loads(args.spec)
        result = jax_worker(spec) if args.worker == "jax" else peer.generate(spec)
        common.finish_worker(args, result)
        return
    if args.quick:
        args.size, args.repeats = "small", min(args.repeats, 3)
    if args.new_tokens == 1:
        parser.error("--new_tokens must be > 1: a decode step is timed against 1 token")

    res = common.run_worker(
        "bench.generate",
        "jax",
        dict(
            size=args.size,
            batches=args.batches,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            copy_mib=args.copy_mib,
        ),
    )
    peer = run_peer(args, res)
    facts = res["facts"]
    bandwidth = res["copy_bandwidth"]["bytes_per_s"]
    errors = [r for r in res["rows"] if "error" in r]
    rows = [_row(f"llama_jax {r['variant']}", r, bandwidth) for r in res["rows"] if r not in errors]
    for r in errors:
        print(f"llama_jax {r['variant']} batch {r['batch']} failed: {r['error']}")
    if "skipped" not in peer and "error" not in peer:
        rows += [_row("transformers bf16", r, None) for r in peer["rows"]]
        peer_tok_s = {r["batch"]: r["decode_tok_s"] for r in peer["rows"]}
        for row in rows:
            theirs = peer_tok_s.get(row["batch"])
            if row["variant"].startswith("llama_jax") and theirs and row["decode_tok_s"]:
                row["vs_peer"] = round(row["decode_tok_s"] / theirs, 3)
    print(
        f"{res['size']}: {res['num_params']:,} parameters, prompt {res['prompt_len']}, "
        f"{res['new_tokens']} new tokens, greedy, on {facts['device']}; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s"
    )
    columns = [
        "variant",
        "batch",
        "prefill_ms",
        "decode_step_ms",
        "decode_tok_s",
        "mb_per_step",
        "bound_ms",
        "frac_of_bound",
        "vs_peer",
    ]
    print(common.table(rows, columns))

    def pick(variant, batch, key):
        found = [r.get(key) for r in rows if (r["variant"], r["batch"]) == (variant, batch)]
        return found[0] if found else None

    on_target = res["size"] == "1b" and facts["platform"] == "gpu"
    targets = [
        common.target(
            "decode_b1_bf16_bandwidth",
            "batch-1 bf16 decode step at the llama3.2-1b shape, as a fraction of its "
            "memory-bandwidth bound",
            pick("llama_jax bf16", 1, "frac_of_bound"),
            0.8,
            ">=",
            "fraction of the bound",
            on_target,
        ),
        common.target(
            "decode_b16_vs_peer",
            "batch-16 bf16 decode tokens/s at the llama3.2-1b shape over transformers' "
            "static-cache generate",
            pick("llama_jax bf16", 16, "vs_peer"),
            2.0,
            ">=",
            "x the peer",
            on_target,
        ),
    ]
    common.print_targets(targets)
    path = common.write_result(
        "generate",
        facts["device"],
        dict(
            facts=facts,
            config=dict(
                size=res["size"],
                model=res["model"],
                num_params=res["num_params"],
                dtype=res["dtype"],
                prompt_len=res["prompt_len"],
                new_tokens=res["new_tokens"],
                batches=args.batches,
                repeats=args.repeats,
                sampling="greedy, EOS off",
            ),
            copy_bandwidth=res["copy_bandwidth"],
            rows=rows,
            errors=errors,
            targets=targets,
            jax=res,
            peer=peer,
            units=dict(
                prefill_ms="ms (median)",
                decode_step_ms="ms per decode step (all rows)",
                decode_tok_s="tokens/s over all rows",
                end_to_end_tok_s="tokens/s including prefill",
                mb_per_step="MB (1e6 bytes) read per decode step at least",
                bound_ms="ms: mb_per_step at the measured copy bandwidth",
                frac_of_bound="bound_ms / decode_step_ms",
                achieved_gb_s="GB/s: mb_per_step / decode_step_ms",
                vs_peer="decode tokens/s over the peer's at the same batch",
                copy_bandwidth="bytes/s (read + write)",
            ),
        ),
        quick=args.quick and facts["platform"] != "cpu",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
