"""The peer the benchmarks compare against: Hugging Face transformers'
`LlamaForCausalLM` on PyTorch, with the same LlamaConfig, run the way its users run it.

Training: float32 weights under bf16 autocast, SDPA attention, fused AdamW (decay on
matrices only) with llama_jax's learning-rate schedule, global-norm clipping, the
model's own loss; `torch.compile` optional.
Decoding: `generate` with the static KV cache, greedy; transformers compiles the decode
step itself on CUDA.

Runs in a worker process of bench.train / bench.generate (no JAX device in it).
"""

from __future__ import annotations

import math
import os
import time

from bench import common


def _torch():
    import torch

    return torch


def _device(platform: str):
    """The torch device matching the one JAX ran on ('gpu' or 'cpu')."""
    torch = _torch()
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("JAX ran on a GPU, but this PyTorch build sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _sync_fn(device):
    torch = _torch()

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    return sync


def facts(device) -> dict:
    torch = _torch()
    out = dict(
        torch_device=str(device),
        torch_threads=torch.get_num_threads(),
        cuda=torch.version.cuda,
        host_load_1min=round(os.getloadavg()[0], 2),
    )
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def hf_model(model_config: dict, dtype: str, device):
    """LlamaForCausalLM with random weights for a LlamaConfig dict (`to_dict()`),
    created on `device` in `dtype`, SDPA attention."""
    import transformers

    from llama_jax.config import LlamaConfig

    torch = _torch()
    hf = transformers.LlamaConfig(
        **LlamaConfig.from_dict(model_config).to_hf(), attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf)
    return model.to(getattr(torch, dtype))


def _lr_factor(cfg: dict, step: int) -> float:
    """The learning rate of llama_jax's schedule (optim.learning_rate_schedule) at
    `step`, over the peak: linear warmup from 0, then cosine or linear decay."""
    warmup, total, end = cfg["warmup_steps"], cfg["total_steps"], cfg["end_lr_ratio"]
    if step < warmup:
        return step / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    if cfg["decay"] == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg["decay"] == "linear":
        return 1 - (1 - end) * frac
    return 1.0


def train(spec: dict) -> dict:
    """Train-step throughput. spec: platform (JAX's), model (LlamaConfig dict), batch,
    seq, dtype (compute; weights stay float32), optimizer (OptimizerConfig fields),
    warmup, steps, compile, remat (transformers' gradient checkpointing)."""
    torch = _torch()
    device = _device(spec["platform"])
    model = hf_model(spec["model"], "float32", device)
    if spec["remat"]:
        model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt_cfg = spec["optimizer"]
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            dict(params=matrices, weight_decay=opt_cfg["weight_decay"]),
            dict(params=vectors, weight_decay=0.0),
        ],
        lr=opt_cfg["learning_rate"],
        betas=(opt_cfg["b1"], opt_cfg["b2"]),
        eps=opt_cfg["eps"],
        fused=True,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(opt_cfg, s))
    forward = torch.compile(model) if spec["compile"] else model
    mixed = spec["dtype"] == "bfloat16"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, spec["model"]["vocab_size"], (spec["batch"], spec["seq"]), generator=gen
    ).to(device)
    params = list(model.parameters())

    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt_cfg["clip_norm"], foreach=True)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return loss

    sync = _sync_fn(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The first step (CUDA start-up, autotuning, torch.compile) counts as a warm-up.
    start = time.perf_counter()
    loss = step()
    sync(loss)
    first_s = time.perf_counter() - start
    timed = common.time_calls(step, warmup=spec["warmup"] - 1, repeats=spec["steps"], sync=sync)
    out = dict(
        facts(device),
        params=n_params,
        compiled=bool(spec["compile"]),
        gradient_checkpointing=bool(spec["remat"]),
        first_step_s=first_s,
        step_s=timed,
        loss_first=float(losses[0]),
        loss_last=float(losses[-1]),
    )
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def generate(spec: dict) -> dict:
    """Greedy decode throughput with the static cache. spec: platform, model, dtype,
    batches, prompt_len, new_tokens, repeats. Prefill is timed as `generate` with one
    new token; a decode step as the difference to `new_tokens`, over new_tokens - 1."""
    import transformers

    torch = _torch()
    device = _device(spec["platform"])
    model = hf_model(spec["model"], spec["dtype"], device).eval()
    vocab, pad = spec["model"]["vocab_size"], spec["model"]["pad_token_id"] or 0
    n, p = spec["new_tokens"], spec["prompt_len"]
    sync = _sync_fn(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in spec["batches"]:
        ids = torch.randint(3, vocab, (b, p), generator=gen).to(device)
        mask = torch.ones_like(ids)

        def run(new, ids=ids, mask=mask):
            # min = max new tokens: every row decodes exactly `new` tokens, as ours do.
            cfg = transformers.GenerationConfig(
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                num_beams=1,
                cache_implementation="static",
                pad_token_id=pad,
            )
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

        # The first call of each length is the warm-up (on CUDA it compiles the step).
        out = run(n)
        if tuple(out.shape) != (b, p + n):
            raise RuntimeError(f"transformers generated {tuple(out.shape)}; expected {(b, p + n)}")
        sync(run(1))
        kw = dict(warmup=0, repeats=spec["repeats"], sync=sync)
        full = common.time_calls(lambda run=run: run(n), **kw)
        first = common.time_calls(lambda run=run: run(1), **kw)
        step_s = (full["median"] - first["median"]) / (n - 1)
        rows.append(
            dict(
                batch=b,
                prefill_s=first["median"],
                total_s=full["median"],
                decode_step_s=step_s,
                decode_tok_s=b / step_s if step_s > 0 else None,
                end_to_end_tok_s=b * n / full["median"],
                times=dict(total=full, prefill=first),
            )
        )
    return dict(facts(device), params=sum(x.numel() for x in model.parameters()), rows=rows)
