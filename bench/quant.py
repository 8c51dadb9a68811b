r"""Int8 weight-only quantization benchmark: decode speed against bf16, the skinny
matmul against the memory bound, and quality on a trained model.

  python -m bench.quant                                  # CPU: tiny; accelerators: llama3.2-1b
  python -m bench.quant --quick                          # tiny preset, fewer repeats
  python -m bench.quant --model_dir=/tmp/llama_jax_demo/teacher \
      --eval_data=/tmp/llama_jax_demo/eval.jsonl         # + perplexity and logit error

Decode: decode tokens/s of `generate` from 1-token prompts, measured as bench.generate
does (prefill subtracted), for the bf16 model and its int8 quantization at several
batch sizes. Matmul: an [M, 8192] x [8192, 8192] product with bf16 weights, int8
weights through XLA, and (on GPU) the Pallas kernel; medians of synchronised calls
after a warm-up.
"""

from __future__ import annotations

import argparse

from bench import common


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args), after one warm-up call, synchronised."""
    return common.time_calls(lambda: fn(*args), repeats=repeats)["median"]


def matmul(sizes, k: int = 8192, n: int = 8192, repeats: int = 5) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from llama_jax import compress
    from llama_jax.nn import int8_matmul

    on_gpu = jax.devices()[0].platform == "gpu"
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (k, n), jnp.bfloat16)
    q, s = compress.quantize(w, 1, stacked=False)
    dims = (((1,), (0,)), ((), ()))
    rows = []
    for m in sizes:
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        bf16 = jax.jit(lambda x, w: x @ w)
        xla = jax.jit(
            lambda x, q, s: compress.int8_dot_general(x, q, dims, scale=s, use_kernel=False)
        )
        t_bf16 = _time(bf16, x, w, repeats=repeats)
        t_int8 = _time(xla, x, q, s, repeats=repeats)
        row = dict(m=m, bf16_us=round(1e6 * t_bf16, 1), int8_xla_us=round(1e6 * t_int8, 1))
        if on_gpu:
            kernel = jax.jit(lambda x, q, s: int8_matmul(x, q, s))
            try:
                t_kernel = _time(kernel, x, q, s, repeats=repeats)
            except Exception as e:
                row["int8_pallas_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"Pallas int8 kernel at M={m} failed: {row['int8_pallas_error']}")
            else:
                row["int8_pallas_us"] = round(1e6 * t_kernel, 1)
                row["pallas_gb_per_s"] = round((k * n + m * k * 2) / t_kernel / 1e9, 1)
        rows.append(row)
    return rows


def decode(preset: str, batches, new_tokens: int, repeats: int = 5) -> list[dict]:
    from bench.generate import time_generate
    from llama_jax.config import get_preset

    model, q_model = common.decode_models(get_preset(preset), "bfloat16")
    rows = []
    for b in batches:
        row = dict(batch=b)
        for name, m in (("bf16", model), ("int8", q_model)):
            # A failure (the int8 kernel on an untried GPU) is recorded, not fatal.
            try:
                tok_s = time_generate(m, b, 1, new_tokens, repeats=repeats)["decode_tok_s"]
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{name} decode at batch {b} failed: {row[f'{name}_error']}")
                tok_s = None
            row[f"{name}_tok_s"] = None if tok_s is None else round(tok_s, 1)
        bf16, int8 = row["bf16_tok_s"], row["int8_tok_s"]
        row["int8_over_bf16"] = round(int8 / bf16, 3) if bf16 and int8 else None
        rows.append(row)
    return rows


def quality(model_path: str, eval_data: str) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs.base import base_config
    from llama_jax import compress, distill, formats, nn, train

    model_dir = formats.ModelDir.open(model_path)
    config = model_dir.config
    c = base_config()
    c.data.path, c.data.format, c.data.seq_len, c.data.global_batch = eval_data, "jsonl", 128, 16
    found = model_dir.tokenizer_path
    c.data.tokenizer = found or ""
    setup = train.setup(c, config)
    batches = [next(setup.iterator) for _ in range(8)]
    out = {}
    for mode in (None, "int8"):
        graphdef, abstract = nn.abstract_params(config, setup.mesh, **compress.model_kwargs(mode))
        float_abstract = nn.abstract_params(config, setup.mesh)[1]
        params = model_dir.load_params(float_abstract)
        if mode:
            params = compress.quantize_params(params)
        model = nnx.merge(graphdef, _state(graphdef, abstract, params))
        out[mode or "float"] = dict(
            ppl=distill.heldout_perplexity(nn.make_eval_step(graphdef, 64), params, batches),
            logits=np.asarray(model(batches[0]["tokens"][:2]), np.float32),
        )
    err = float(np.abs(out["int8"]["logits"] - out["float"]["logits"]).max())
    return dict(
        float_ppl=round(out["float"]["ppl"], 4),
        int8_ppl=round(out["int8"]["ppl"], 4),
        ppl_increase_pct=round(100 * (out["int8"]["ppl"] / out["float"]["ppl"] - 1), 3),
        max_logit_error=round(err, 5),
        max_abs_logit=round(float(jnp.abs(out["float"]["logits"]).max()), 3),
    )


def _state(graphdef, abstract, params):
    from flax import nnx

    state = nnx.split(nnx.eval_shape(lambda: nnx.merge(graphdef, abstract)))[1]
    nnx.replace_by_pure_dict(state, params)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="auto", help="auto: tiny on CPU, else llama3.2-1b")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 3 repeats")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--model_dir", default="")
    parser.add_argument("--eval_data", default="")
    args = parser.parse_args()
    facts = common.device_facts()
    on_cpu = facts["platform"] == "cpu"
    reference = "tiny" if on_cpu else "llama3.2-1b"
    if args.quick:
        args.preset, args.repeats = "tiny", min(args.repeats, 3)
    preset = reference if args.preset == "auto" else args.preset

    mm = matmul([1, 16] if on_cpu else [1, 16, 64, 2048], repeats=args.repeats)
    columns = list(dict.fromkeys(c for r in mm for c in r if not c.endswith("_error")))
    print(common.table(mm, columns))
    dec = decode(preset, [1, 16] if on_cpu else [1, 16, 128], args.new_tokens, args.repeats)
    print(common.table(dec, ["batch", "bf16_tok_s", "int8_tok_s", "int8_over_bf16"]))
    payload = dict(
        facts=facts,
        config=dict(preset=preset, new_tokens=args.new_tokens, repeats=args.repeats),
        matmul=mm,
        decode=dec,
        # The performance plan sets no target on these; the decode targets are
        # bench.generate's.
        targets=[],
    )
    if args.model_dir:
        q = quality(args.model_dir, args.eval_data)
        print(common.table([q], list(q)))
        payload["quality"] = dict(q, model_dir=args.model_dir, eval_data=args.eval_data)
    payload["units"] = dict(
        us="microseconds (median)",
        tok_s="decode tokens/s over all rows",
        pallas_gb_per_s="GB/s: int8 weights + activations over the kernel's time",
        ppl="perplexity",
    )
    # A quick run never replaces a reference result (which may hold a quality section).
    path = common.write_result("quant", facts["device"], payload, quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
