r"""Int8 weight-only quantization benchmark: decode speed against bf16, the skinny
matmul against the memory bound, and quality on a trained model.

  python -m bench.quant                                  # CPU: tiny preset shape
  python -m bench.quant --preset=llama3.2-1b             # accelerators
  python -m bench.quant --model_dir=/tmp/llama_jax_demo/teacher \
      --eval_data=/tmp/llama_jax_demo/eval.jsonl         # + perplexity and logit error

Decode: tokens/s of `generate` (prefill excluded: 1-token prompts) for the bf16 model
and its int8 quantization, at several batch sizes. Matmul: an [M, 8192] x [8192, 8192]
product with bf16 weights, int8 weights through XLA, and (on GPU) the Pallas kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import common


def _time(fn, *args, repeats: int = 5) -> float:
    """Median seconds of fn(*args), after one warm-up call, synchronised."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul(sizes, k: int = 8192, n: int = 8192) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from llama_jax import quant
    from llama_jax.kernels.int8_matmul import int8_matmul

    on_gpu = jax.devices()[0].platform == "gpu"
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (k, n), jnp.bfloat16)
    q, s = quant.quantize(w, 1, stacked=False)
    dims = (((1,), (0,)), ((), ()))
    rows = []
    for m in sizes:
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        bf16 = jax.jit(lambda x, w: x @ w)
        xla = jax.jit(lambda x, q, s: quant.int8_dot_general(x, q, dims, scale=s, use_kernel=False))
        t_bf16 = _time(bf16, x, w)
        t_int8 = _time(xla, x, q, s)
        row = dict(m=m, bf16_us=round(1e6 * t_bf16, 1), int8_xla_us=round(1e6 * t_int8, 1))
        if on_gpu:
            kernel = jax.jit(lambda x, q, s: int8_matmul(x, q, s))
            t_kernel = _time(kernel, x, q, s)
            row["int8_pallas_us"] = round(1e6 * t_kernel, 1)
            row["pallas_gb_per_s"] = round((k * n + m * k * 2) / t_kernel / 1e9, 1)
        rows.append(row)
    return rows


def decode(preset: str, batches, new_tokens: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import generate as gen
    from llama_jax import model_dir, quant, sharding
    from llama_jax.config import get_preset
    from llama_jax.model import Llama

    config = get_preset(preset)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    model = sharding.create_sharded(
        lambda: Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        mesh,
        sharding.DEFAULT_RULES,
    )
    graphdef, state = nnx.split(model)
    q_params = jax.jit(quant.quantize_params)(nnx.to_pure_dict(state))
    q_graphdef, q_abstract = model_dir.abstract_params(
        config, mesh, dtype=jnp.bfloat16, quantization="int8"
    )
    q_state = nnx.split(nnx.eval_shape(lambda: nnx.merge(q_graphdef, q_abstract)))[1]
    nnx.replace_by_pure_dict(q_state, q_params)
    q_model = nnx.merge(q_graphdef, q_state)
    rows = []
    for b in batches:
        prompts = [[1]] * b
        out = {}
        for name, m in (("bf16", model), ("int8", q_model)):
            run = lambda m=m, p=prompts: gen.generate(m, p, max_new_tokens=new_tokens, eos_ids=[])
            run()
            start = time.perf_counter()
            run()
            out[name] = b * new_tokens / (time.perf_counter() - start)
        rows.append(
            dict(
                batch=b,
                bf16_tok_s=round(out["bf16"], 1),
                int8_tok_s=round(out["int8"], 1),
                int8_over_bf16=round(out["int8"] / out["bf16"], 3),
            )
        )
    return rows


def quality(model_path: str, eval_data: str) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs.base import base_config
    from llama_jax import distill, model_dir, quant, train

    config = model_dir.read_config(model_path)
    c = base_config()
    c.data.path, c.data.format, c.data.seq_len, c.data.global_batch = eval_data, "jsonl", 128, 16
    found = model_dir.find_tokenizer(model_path)
    c.data.tokenizer = found or ""
    su = train.setup(c, config)
    batches = [next(su.iterator) for _ in range(8)]
    out = {}
    for mode in (None, "int8"):
        graphdef, abstract = model_dir.abstract_params(config, su.mesh, quantization=mode)
        float_abstract = model_dir.abstract_params(config, su.mesh)[1]
        params = model_dir.load_params(model_path, config, float_abstract)
        if mode:
            params = quant.quantize_params(params)
        model = nnx.merge(graphdef, _state(graphdef, abstract, params))
        out[mode or "float"] = dict(
            ppl=distill.perplexity(distill.make_eval_step(graphdef, 64), params, batches),
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
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--model_dir", default="")
    parser.add_argument("--eval_data", default="")
    args = parser.parse_args()
    import jax

    on_cpu = jax.devices()[0].platform == "cpu"
    mm = matmul([1, 16] if on_cpu else [1, 16, 64, 2048])
    print(common.table(mm, list(mm[0])))
    dec = decode(args.preset, [1, 16] if on_cpu else [1, 16, 128], args.new_tokens)
    print(common.table(dec, list(dec[0])))
    payload = dict(
        config=dict(preset=args.preset, new_tokens=args.new_tokens), matmul=mm, decode=dec
    )
    if args.model_dir:
        q = quality(args.model_dir, args.eval_data)
        print(common.table([q], list(q)))
        payload["quality"] = dict(q, model_dir=args.model_dir, eval_data=args.eval_data)
    payload["units"] = dict(us="microseconds", tok_s="tokens/s", ppl="perplexity")
    path = common.write_result("quant", common.device_name(), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
