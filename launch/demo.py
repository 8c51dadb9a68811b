r"""The end-to-end demo: distil a small teacher into a smaller student, offline, on a CPU.

  python -m launch.demo [--workdir=/tmp/llama_jax_demo] [--scale=full|small]

1. Builds a corpus from the Python standard library's own source files (every machine
   with Python has them; nothing is downloaded), holding out one file in twenty.
2. Trains a SentencePiece tokenizer on it.
3. Trains a teacher, then distils a smaller student with KD, and trains the same
   student with cross-entropy only for the same steps.
4. Prints held-out perplexity of the three, samples from each, and writes the loss
   curves to <workdir>/loss_curves.png. Every run keeps its Orbax checkpoints under
   <workdir>/{teacher,student_kd,student_ce}.
5. Writes the KD student as <workdir>/student_kd.q8_0.gguf, the file a user deploys
   (`llama-cli -m student_kd.q8_0.gguf`), and prints its size beside the float
   checkpoint's.
"""

import json
import os
import shutil
import sysconfig
import time
import zlib

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/llama_jax_demo", "Where everything is written.")
_SCALE = flags.DEFINE_enum(
    "scale", "full", ["full", "small"], "full: the demo (minutes); small: a quick check."
)

# Model shapes and run lengths per scale. The vocabulary is the tokenizer's.
SCALES = {
    "full": dict(
        corpus_chars=3_000_000,
        vocab=1024,
        teacher="embed_dim=128,num_layers=4,num_heads=4,num_kv_heads=2,head_dim=32,mlp_dim=352",
        student="embed_dim=64,num_layers=2,num_heads=4,num_kv_heads=2,head_dim=16,mlp_dim=176",
        teacher_steps=400,
        student_steps=300,
        seq_len=128,
        batch=16,
    ),
    "small": dict(
        corpus_chars=300_000,
        vocab=512,
        teacher="embed_dim=64,num_layers=2,num_heads=4,num_kv_heads=2,head_dim=16,mlp_dim=176",
        student="embed_dim=32,num_layers=1,num_heads=2,num_kv_heads=1,head_dim=16,mlp_dim=88",
        teacher_steps=80,
        student_steps=50,
        seq_len=64,
        batch=16,
    ),
}
PROMPTS = ("def __init__(self", "import os\nimport ", "class Parser:\n    ")


def build_corpus(out_dir: str, max_chars: int) -> tuple[str, str, str]:
    """Writes train.jsonl, eval.jsonl (one source file per line) and train.txt (for the
    tokenizer trainer) from the standard library's .py files, in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "site-packages", "idlelib"))
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    if not files:
        raise RuntimeError(f"no Python source files under {stdlib}")
    paths = [os.path.join(out_dir, n) for n in ("train.jsonl", "eval.jsonl", "train.txt")]
    train_chars = held_chars = 0
    with open(paths[0], "w") as train, open(paths[1], "w") as held, open(paths[2], "w") as txt:
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not 1_000 <= len(text) <= 60_000:
                continue
            name = os.path.relpath(path, stdlib)
            if zlib.crc32(name.encode()) % 20 == 0:
                if held_chars < max_chars // 10:
                    held.write(json.dumps({"text": text}) + "\n")
                    held_chars += len(text)
            elif train_chars < max_chars:
                train.write(json.dumps({"text": text}) + "\n")
                txt.write(text + "\n")
                train_chars += len(text)
            if train_chars >= max_chars and held_chars >= max_chars // 10:
                break
    return tuple(paths)


def train_tokenizer(text_path: str, out_dir: str, vocab: int) -> str:
    import sentencepiece as spm

    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=text_path,
        model_prefix=prefix,
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        num_threads=2,
        minloglevel=2,
    )
    return prefix + ".model"


def run_config(kind: str, s: dict, data: str, tokenizer: str, steps: int, arch: str):
    """The config of one demo run: `kind` "train" or "distill" of the tiny preset with
    `arch` overrides, at scale `s`, for `steps` steps."""
    from configs.base import base_config, distill_config

    c = distill_config() if kind == "distill" else base_config()
    c.model.preset = "tiny"
    c.model.overrides = f"vocab_size={s['vocab']},{arch}"
    c.model.dtype = "float32"
    c.data.path = data
    c.data.format = "jsonl"
    c.data.tokenizer = tokenizer
    c.data.seq_len = s["seq_len"]
    c.data.global_batch = s["batch"]
    c.train.steps = steps
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0
    c.train.loss_chunk = 64
    c.train.log_every = max(steps // 20, 1)
    c.checkpoint.save_every = steps
    c.checkpoint.async_save = False
    return c


def _read_metrics(workdir: str) -> list[dict]:
    """The logged steps of a run (not its closing time summary)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _plot(path: str, curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy on the data (nats/token)")
    ax.set_title("llama_jax demo: teacher, KD student, CE-only student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(workdir: str, scale: str) -> dict:
    import jax

    from llama_jax import distill, formats, nn, train
    from llama_jax.data import Tokenizer

    s = SCALES[scale]
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    say("building the corpus from the Python standard library's source")
    train_data, eval_data, text = build_corpus(workdir, s["corpus_chars"])
    say(f"training a SentencePiece tokenizer ({s['vocab']} pieces)")
    tok_path = train_tokenizer(text, workdir, s["vocab"])
    tokenizer = Tokenizer.from_file(tok_path)

    runs = {name: os.path.join(workdir, name) for name in ("teacher", "student_kd", "student_ce")}
    # A rerun starts over: the tokenizer it just trained may differ from the old runs'.
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)
    say(f"training the teacher ({s['teacher_steps']} steps)")
    train.run(
        run_config("train", s, train_data, tok_path, s["teacher_steps"], s["teacher"]),
        runs["teacher"],
    )
    say(f"distilling the student with KD ({s['student_steps']} steps)")
    kd = run_config("distill", s, train_data, tok_path, s["student_steps"], s["student"])
    kd.teacher.model_dir = runs["teacher"]
    kd.teacher.dtype = "float32"
    kd.distill.alpha = 0.5
    kd.distill.temperature = 1.0
    distill.run(kd, runs["student_kd"])
    say(f"training the same student with cross-entropy only ({s['student_steps']} steps)")
    train.run(
        run_config("train", s, train_data, tok_path, s["student_steps"], s["student"]),
        runs["student_ce"],
    )

    say("scoring held-out perplexity")
    ev = run_config("train", s, eval_data, tok_path, 1, s["student"])
    model_dirs = {name: formats.ModelDir.open(path) for name, path in runs.items()}
    setup = train.setup(ev, model_dirs["teacher"].config)
    batches = [next(setup.iterator) for _ in range(8)]
    results = {}
    for name, model_dir in model_dirs.items():
        graphdef, abstract = model_dir.abstract(setup.mesh, setup.rules)
        params = model_dir.load_params(abstract)
        ppl = distill.heldout_perplexity(nn.make_eval_step(graphdef, 64), params, batches)
        model = model_dir.load()
        ids = tokenizer.encode_batch(list(PROMPTS), add_bos=True)
        outs = nn.generate(
            model,
            ids,
            max_new_tokens=40,
            sampling=nn.Sampling(temperature=0.9, top_k=20),
            seed=0,
            eos_ids=tokenizer.eos_ids,
            pad_id=tokenizer.pad_id,
        )
        samples = [p + tokenizer.decode(o) for p, o in zip(PROMPTS, outs, strict=True)]
        results[name] = dict(
            eval_ppl=ppl,
            params=model_dir.config.num_params(),
            layers=model_dir.config.num_layers,
            samples=samples,
        )
        del params, model
    jax.clear_caches()

    curves = {
        "teacher": [(m["step"], m["loss"]) for m in _read_metrics(runs["teacher"])],
        "student, KD (its data CE)": [
            (m["step"], m["ce"]) for m in _read_metrics(runs["student_kd"])
        ],
        "student, CE only": [(m["step"], m["loss"]) for m in _read_metrics(runs["student_ce"])],
    }
    png = os.path.join(workdir, "loss_curves.png")
    _plot(png, curves)

    print()
    print(f"{'model':<12} {'params':>9} {'layers':>6} {'held-out ppl':>13}")
    for name, r in results.items():
        print(f"{name:<12} {r['params']:>9,} {r['layers']:>6} {r['eval_ppl']:>13.2f}")
    print()
    for name, r in results.items():
        print(f"--- samples from {name} (temperature 0.9, top-k 20, seed 0)")
        for line in r["samples"]:
            print("   ", line.replace("\n", "\\n")[:100])
    print()
    gguf = write_gguf(runs["student_kd"], os.path.join(workdir, "student_kd.q8_0.gguf"))
    summary = dict(
        scale=scale,
        seconds=round(time.perf_counter() - start, 1),
        results=results,
        loss_curves=png,
        runs=runs,
        gguf=gguf,
    )
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    say(f"done: {png}, {os.path.join(workdir, 'summary.json')}")
    return summary


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def write_gguf(run_dir: str, out: str) -> dict:
    """Writes the run's student as a q8_0 GGUF file and prints its size beside the float
    checkpoint's (the float parameters, and the step directory with optimizer state)."""
    from llama_jax import formats

    run = formats.ModelDir.open(run_dir)
    float_bytes = run.config.num_params() * run.stored_float_dtype.itemsize
    step_bytes = _dir_bytes(str(run.step_dir))
    formats.export_gguf(run, out, kind="q8_0", overwrite=True)
    size = os.path.getsize(out)
    print(f"{'KD student':<26} {'bytes':>12}")
    print(f"{'float32 parameters':<26} {float_bytes:>12,}")
    print(f"{'checkpoint step (+ Adam)':<26} {step_bytes:>12,}")
    print(f"{'q8_0 GGUF':<26} {size:>12,}   ({float_bytes / size:.1f}x smaller)")
    print(f"    run it with llama.cpp: llama-cli -m {out}")
    return dict(path=out, bytes=size, float_param_bytes=float_bytes, checkpoint_bytes=step_bytes)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    common.quiet_logs()
    run(_WORKDIR.value, _SCALE.value)


if __name__ == "__main__":
    common.run(main)
