r"""On-policy distillation benchmark: where a step's time goes, and what sampling buys.

  python -m bench.on_policy            # the demo-sized teacher and a 2-layer student
  python -m bench.on_policy --quick    # the small demo scale, shorter runs

A teacher is trained on the demo's corpus (Python standard library source,
SentencePiece BPE). Two 2-layer students then distil from it for the same number of
steps with the same divergence (the generalized JSD of `beta`): off-policy (lmbda 0,
the data's tokens) and on-policy (lmbda 0.5, the student's own continuations of
prompts cut from the rows). Reported for each:

- held-out perplexity (the data's tokens);
- the teacher's mean log-likelihood per token of 64-token samples the student writes
  (temperature 1) after 16-token prompts from held-out files: what on-policy training
  optimises, and where it should win;
- seconds spent generating and training (the on-policy run's generation is timed on its
  own: the step waits for it), and generated tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from bench import common

# (demo scale, teacher steps, student steps, max_new_tokens) per mode.
MODES = {"quick": ("small", 80, 60, 24), "full": ("full", 400, 300, 48)}
SAMPLE_PROMPT, SAMPLE_NEW = 16, 64


def _sample_loglik(student_dir, teacher_dir, prompts, seed=0) -> dict:
    """The teacher's mean log p per sampled token of the student's continuations."""
    import jax
    import jax.numpy as jnp

    from llama_jax import formats, nn

    student, _ = formats.load_model(student_dir)
    teacher, config = formats.load_model(teacher_dir)
    new = nn.generate(
        student,
        prompts,
        max_new_tokens=SAMPLE_NEW,
        sampling=nn.Sampling(temperature=1.0),
        eos_ids=(),
        seed=seed,
    )
    total = count = 0.0
    for prompt, cont in zip(prompts, new, strict=True):
        tokens = jnp.asarray([list(prompt) + list(cont)], jnp.int32)
        logp = jax.nn.log_softmax(teacher(tokens)[0].astype(jnp.float32), axis=-1)
        picked = logp[len(prompt) - 1 : -1][jnp.arange(len(cont)), jnp.asarray(cont)]
        total += float(picked.sum())
        count += len(cont)
    del config
    return dict(teacher_logp=total / count, sampled_tokens=int(count))


def quality(mode: str, workdir: str) -> dict:
    from launch import demo
    from llama_jax import distill
    from llama_jax.data import Tokenizer

    scale, teacher_steps, steps, max_new = MODES[mode]
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)
    s, train_data, eval_data, tok, teacher = common.demo_teacher(scale, teacher_steps, workdir, say)

    runs = {}
    for name, lmbda in (("off-policy", 0.0), ("on-policy", 0.5)):
        say(f"distilling the {name} student ({steps} steps)")
        c = demo.run_config("distill", s, train_data, tok, steps, s["student"])
        c.teacher.model_dir = teacher
        c.teacher.dtype = "float32"
        c.distill.alpha = 1.0
        c.distill.on_policy.update(
            dict(lmbda=lmbda, beta=0.5, max_new_tokens=max_new, temperature=1.0, min_prompt=8)
        )
        out = os.path.join(workdir, name)
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        distill.run(c, out)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            logged = [json.loads(x) for x in f if x.strip()]
        gen_s = sum(x.get("gen_s", 0.0) for x in logged)
        runs[name] = dict(
            path=out,
            wall_s=time.perf_counter() - started,
            gen_s=gen_s,
            train_s=sum(x.get("train_s", 0.0) for x in logged),
            onpolicy_fraction=logged[-1].get("onpolicy_fraction", 0.0),
            gen_tokens_per_s=float(
                np.mean([x["gen_tokens_per_s"] for x in logged if "gen_tokens_per_s" in x] or [0])
            ),
        )

    say("scoring: held-out perplexity and the teacher's likelihood of student samples")
    score = common.heldout_scorer(s, eval_data, tok, teacher)
    tokenizer = Tokenizer.from_file(tok)
    with open(eval_data) as f:
        docs = [json.loads(x)["text"] for x in f if x.strip()]
    prompts = [tokenizer.encode(d)[:SAMPLE_PROMPT] for d in docs[:16]]
    rows = []
    for name, path in [("teacher", teacher)] + [(n, r["path"]) for n, r in runs.items()]:
        ppl, _ = score(path)
        row = dict(model=name, eval_ppl=round(ppl, 3))
        row |= {k: round(v, 4) for k, v in _sample_loglik(path, teacher, prompts).items()}
        r = runs.get(name, {})
        row |= {k: round(r[k], 3) for k in ("onpolicy_fraction", "gen_s", "train_s") if k in r}
        if r.get("gen_tokens_per_s"):
            row["gen_tokens_per_s"] = round(r["gen_tokens_per_s"], 1)
        rows.append(row)
    return dict(
        mode=mode,
        scale=scale,
        teacher_steps=teacher_steps,
        student_steps=steps,
        max_new_tokens=max_new,
        rows=rows,
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small scale, shorter runs")
    parser.add_argument("--workdir", default="", help="where the runs go (default: temp)")
    args = parser.parse_args()
    facts = common.device_facts()
    workdir = args.workdir or tempfile.mkdtemp(prefix="llama_jax_bench_on_policy_")
    try:
        q = quality("quick" if args.quick else "full", workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    columns = [
        "model",
        "eval_ppl",
        "teacher_logp",
        "onpolicy_fraction",
        "gen_s",
        "train_s",
        "gen_tokens_per_s",
    ]
    print(common.table(q["rows"], columns))
    by = {r["model"]: r for r in q["rows"]}
    targets = [
        common.target(
            "on_policy_sample_likelihood",
            "teacher's mean log p of the on-policy student's samples minus the off-policy "
            "student's (same steps, same divergence)",
            by["on-policy"]["teacher_logp"] - by["off-policy"]["teacher_logp"],
            0.0,
            ">=",
            "nats per token",
            True,
        )
    ]
    common.print_targets(targets)
    path = common.write_result(
        "on_policy",
        facts["device"],
        dict(
            facts=facts,
            quality=q,
            targets=targets,
            units=dict(
                eval_ppl="perplexity",
                teacher_logp="nats per sampled token",
                gen_s="s",
                train_s="s",
                gen_tokens_per_s="tokens/s",
            ),
        ),
        quick=args.quick,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
