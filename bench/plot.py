"""Charts of benchmark results: one PNG beside each JSON, drawn from the JSON alone.

  python -m bench.plot bench/results/*.json     # redraw charts from saved results

matplotlib (the [demo] extra) is imported only here and only when drawing; without it
the chart is skipped with a note.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path


def _label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _bars(ax, groups, series: dict, ylabel: str, title: str, fmt=_label) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series (None skipped)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        kept = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if not kept:
            continue
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
        ax.bar_label(bars, labels=[fmt(v) for _, v in kept], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), [textwrap.fill(str(g), 16) for g in groups])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8)


def _train(d, axes) -> str:
    rows = d["rows"]
    names = [r["framework"] for r in rows]
    _bars(axes[0], names, {"tokens/s": [r["tokens_per_s"] for r in rows]}, "tokens/s", "throughput")
    if all(r["mfu"] is not None for r in rows):
        _bars(axes[1], names, {"MFU": [r["mfu"] for r in rows]}, "fraction of peak", "MFU")
    else:
        _bars(axes[1], names, {"step": [r["step_ms"] for r in rows]}, "ms", "step time (median)")
    c = d["config"]
    return (
        f"train: {c['size']} ({c['num_params'] / 1e6:.1f}M params), batch {c['batch']} x seq "
        f"{c['seq']}, {c['model_settings']['dtype']} compute"
    )


def _generate(d, axes) -> str:
    rows = d["rows"]
    batches = sorted({r["batch"] for r in rows})

    def col(variant, key):
        by_batch = {r["batch"]: r.get(key) for r in rows if r["variant"] == variant}
        return [by_batch.get(b) for b in batches]

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    _bars(
        axes[0],
        [f"batch {b}" for b in batches],
        {v: col(v, "decode_tok_s") for v in variants},
        "tokens/s",
        "decode throughput",
    )
    ours = [v for v in variants if any(r["variant"] == v and r.get("frac_of_bound") for r in rows)]
    _bars(
        axes[1],
        [f"batch {b}" for b in batches],
        {v: col(v, "frac_of_bound") for v in ours},
        "fraction",
        "decode step: bandwidth bound / measured",
        fmt="{:.2f}".format,
    )
    axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    c = d["config"]
    return (
        f"generate: {c['size']} ({c['num_params'] / 1e6:.1f}M params), prompt "
        f"{c['prompt_len']}, {c['new_tokens']} new tokens, greedy"
    )


def _distill(d, axes) -> str:
    mem = d["loss_memory"]["rows"]
    _bars(
        axes[0],
        [r["loss"] for r in mem],
        {"temp": [r["temp_gb"] for r in mem]},
        "GB",
        f"loss + gradient temp memory (vocab {d['loss_memory']['vocab']})",
    )
    s = d["step"]
    label = "tokens/s" + ("" if s["mfu"] is None else f" (MFU {100 * s['mfu']:.1f}%)")
    _bars(axes[1], [s["size"]], {label: [s["tokens_per_s"]]}, "tokens/s", "distillation step")
    axes[1].legend(fontsize=8)
    return f"distill: teacher {s['teacher_params']:,} -> student {s['student_params']:,} params"


def _quant(d, axes) -> str:
    mm = d["matmul"]
    keys = [k for k in ("bf16_us", "int8_xla_us", "int8_pallas_us") if any(k in r for r in mm)]
    _bars(
        axes[0],
        [f"M={r['m']}" for r in mm],
        {k.removesuffix("_us"): [r.get(k) for r in mm] for k in keys},
        "microseconds",
        "[M, 8192] x [8192, 8192]",
    )
    dec = d["decode"]
    _bars(
        axes[1],
        [f"batch {r['batch']}" for r in dec],
        {"bf16": [r["bf16_tok_s"] for r in dec], "int8": [r["int8_tok_s"] for r in dec]},
        "tokens/s",
        "decode",
    )
    return f"quant: {d['config']['preset']}"


def _convert(d, axes) -> str:
    rows = d["rows"]
    names = [r["step"] for r in rows]
    _bars(axes[0], names, {"s": [r["seconds"] for r in rows]}, "seconds", "time")
    _bars(axes[1], names, {"GB": [r["peak_rss_gb"] for r in rows]}, "GB", "peak RSS")
    limit = d["summary"].get("rss_limit_gb")
    if limit:
        axes[1].axhline(limit, color="red", linestyle="--", linewidth=1, label="limit")
        axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    return f"convert: {d['config']['preset']} ({d['config']['dtype']})"


def _prune(d, axes) -> str:
    s = d["step"]
    _bars(
        axes[0],
        ["AdamW", "AdamW + pruning"],
        {"ms": [s["dense_step_ms"], s["pruned_step_ms"]]},
        "ms",
        f"train step (mask update {s['mask_update_ms']} ms / 100 steps)",
    )
    rows = d["quality"]["rows"]
    _bars(
        axes[1],
        [r["model"] for r in rows],
        {"perplexity": [r["eval_ppl"] for r in rows]},
        "held-out perplexity",
        "quality",
    )
    axes[1].tick_params(axis="x", labelsize=7)
    return f"prune: {s['size']} model ({s['num_params']:,} params) for the step"


def _structured_prune(d, axes) -> str:
    rows = d["rows"]
    _bars(
        axes[0],
        [r["model"] for r in rows],
        {"perplexity": [r["eval_ppl"] for r in rows]},
        "held-out perplexity",
        f"quality after {d['kd_steps']} KD steps",
    )
    axes[0].tick_params(axis="x", labelsize=7)
    speed = d["speed"]
    _bars(
        axes[1],
        [r["model"] for r in speed],
        {"train step ms": [r["step_ms"] for r in speed]},
        "ms",
        "train step, dense vs pruned",
    )
    return f"structured_prune: {d['scale']} teacher"


def _on_policy(d, axes) -> str:
    rows = [r for r in d["quality"]["rows"] if r["model"] != "teacher"]
    _bars(
        axes[0],
        [r["model"] for r in rows],
        {"perplexity": [r["eval_ppl"] for r in rows]},
        "held-out perplexity",
        "held-out perplexity",
    )
    _bars(
        axes[1],
        [r["model"] for r in rows],
        {"teacher log p": [r["teacher_logp"] for r in rows]},
        "nats per sampled token",
        "teacher's log-likelihood of the student's samples",
    )
    q = d["quality"]
    return f"on_policy: {q['scale']} scale, {q['student_steps']} student steps"


def _teacher_logits(d, axes) -> str:
    c = d["cache"]
    _bars(
        axes[0],
        ["bytes/token", "target"],
        {"bytes": [c["bytes_per_token"], 300]},
        "bytes on disk per token",
        f"cache at k = {c.get('top_k', 64)}",
    )
    q = d.get("distillation")
    if q:
        rows = q["rows"]
        _bars(
            axes[1],
            [r["student"] for r in rows],
            {"perplexity": [r["eval_ppl"] for r in rows]},
            "held-out perplexity",
            "students: live teacher vs caches",
        )
    return "teacher_logits"


def _data(d, axes) -> str:
    tok = d["tokenize"]

    def rate(what, n):
        return next(
            (r["tokens_per_s"] for r in tok if r["what"].startswith(what) and r["processes"] == n),
            None,
        )

    _bars(
        axes[0],
        ["1 process", "2 processes"],
        {
            "tokenizer alone": [rate("tokenizer", n) for n in (1, 2)],
            "prepare_data": [rate("prepare", n) for n in (1, 2)],
        },
        "tokens/s",
        "tokenizing: prepare_data end to end vs the bare tokenizer",
    )
    rows = [r for r in d["loader"]["consumers"] if r.get("wait_fraction") is not None]
    consumers = sorted({r["consumer"] for r in rows}, key=lambda c: float(c.split("K")[0]))

    def wait(reader):
        found = {r["consumer"]: r["wait_fraction"] for r in rows if r["reader"].startswith(reader)}
        return [found.get(c) for c in consumers]

    _bars(
        axes[1],
        [f"consumer at {c}" for c in consumers],
        {"token store (prefetch)": wait("store"), ".npy rows (before)": wait("2-D")},
        "fraction of time inside next()",
        f"data wait from gs:// ({d['config']['latency_ms']:g} ms per request)",
        fmt=lambda v: f"{v:.2%}",
    )
    c = d["config"]
    return f"data: a corpus of {c['corpus_chars'] / 1e6:.0f}M characters, rows of {c['seq_len']}"


_CHARTS = {
    "data": _data,
    "train": _train,
    "generate": _generate,
    "distill": _distill,
    "quant": _quant,
    "convert": _convert,
    "prune": _prune,
    "structured_prune": _structured_prune,
    "on_policy": _on_policy,
    "teacher_logits": _teacher_logits,
}


def save_chart(json_path) -> Path | None:
    """Draws the chart of a result file next to it (same name, .png); returns its path,
    or None (with a printed note) when matplotlib is missing."""
    json_path = Path(json_path)
    d = json.loads(json_path.read_text())
    draw = _CHARTS.get(d.get("benchmark"))
    if draw is None:
        print(f"no chart for {json_path.name}: unknown benchmark {d.get('benchmark')!r}")
        return None
    try:
        import matplotlib
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install -e '.[demo]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    title = draw(d, axes)
    fig.suptitle(f"{title}\n{d['device']} | {d['date']}", fontsize=10)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        save_chart(arg)
