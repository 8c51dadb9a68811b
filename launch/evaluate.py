r"""Evaluate one or several model directories: perplexity of a text or JSONL file or of a token
store, and task files.

  python -m launch.evaluate --model_dir=DIR --data=held_out.txt --seq_len=1024
  python -m launch.evaluate --model_dir=DIR --data=held_out.txt --seq_len=1024 --stride=512
  python -m launch.evaluate --model_dir=DIR --data=eval.jsonl --field=text
  python -m launch.evaluate --model_dir=gs://bucket/student --data=gs://bucket/held_out_store
  python -m launch.evaluate --model_dir=DIR --num_fewshot=3 \
      --tasks=configs/tasks/arithmetic_mc.jsonl,configs/tasks/word_echo_generate.jsonl
  python -m launch.evaluate --model_dir=teacher,student,student_int8 --data=held_out.txt \
      --tasks=configs/tasks/arithmetic_mc.jsonl --report=/tmp/compare

--model_dir is any model directory (converted, a training run, Hugging Face; local or gs://),
or several separated by commas: each is checked before any is loaded, then loaded, scored and
freed in turn. A text --data file is one document, tokenized as the tokenizer does by default,
and scored in windows of --seq_len tokens (disjoint, or every --stride tokens); --split=
blank_lines or a JSONL file scores documents separately (llama_jax/evals/perplexity.py). A
token store (python -m launch.prepare_data) is scored row by row, each row once.

Prints one JSON line per result on stdout: for each model, the perplexity of --data
({"model", "data", "perplexity", "bits_per_byte", "word_perplexity", "tokens", "method",
...}), then one line per task file ({"model", "task", "type", "num_fewshot", "n",
"metrics"}). With several models a Markdown table follows (rows: models; columns:
perplexity, bits per byte, each task's metrics, parameters, bytes on disk). --output
writes the JSON lines to a file, with every example's prompt, scores and prediction under
"examples" when --details is set; --report=PREFIX writes the table as PREFIX.jsonl,
PREFIX.md and PREFIX.png. Task files and scoring rules: llama_jax/evals/tasks.py,
llama_jax/evals/task_metrics.py, llama_jax/evals/evaluate.py. Progress goes to stderr.
"""

import json
import os

from absl import app, flags

from launch import common

_MODEL_DIR = flags.DEFINE_list(
    "model_dir",
    None,
    "Model directories (converted, Hugging Face, or training runs), comma-separated.",
    required=True,
)
_DATA = flags.DEFINE_string(
    "data",
    None,
    "Text or JSONL file to measure perplexity on, or a token store (launch.prepare_data), "
    "whose rows are scored in order.",
)
_FORMAT = flags.DEFINE_enum(
    "format", None, ["text", "jsonl"], "Format of --data (default: jsonl for .jsonl/.json)."
)
_SPLIT = flags.DEFINE_enum(
    "split",
    None,
    ["none", "blank_lines"],
    "Text --data only: one document (none, the default) or one per blank-line-separated block.",
)
_FIELD = flags.DEFINE_string("field", "text", "JSONL key holding each document.")
_STRIDE = flags.DEFINE_integer(
    "stride",
    None,
    "Perplexity: predictions per window after the first, the rest of the window being "
    "context (default: --seq_len, disjoint windows).",
    lower_bound=1,
)
_ADD_BOS = flags.DEFINE_bool(
    "add_bos", None, "Start each document and prompt with BOS (default: as the tokenizer does)."
)
_ADD_EOS = flags.DEFINE_bool("add_eos", False, "Perplexity: end each document with EOS.")
_TASKS = flags.DEFINE_list("tasks", [], "Task files (JSONL), comma-separated.")
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "Few-shot examples per prompt (default: each task's own).", lower_bound=0
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len",
    None,
    "Longest token sequence the model sees (default: the smallest max_position_embeddings of "
    "the models, at most 2048).",
    lower_bound=2,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Rows per step; a multiple of the mesh's batch shards.", lower_bound=1
)
_MESH = flags.DEFINE_string("mesh", "fsdp=-1", "Mesh to evaluate on, e.g. 'fsdp=-1,tensor=4'.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Compute and parameter dtype."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer directory or file for every model (default: each one's own)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON lines to this file.")
_DETAILS = flags.DEFINE_bool("details", False, "Per-example results in --output.")
_REPORT = flags.DEFINE_string(
    "report", None, "Write the table of models as PREFIX.jsonl, PREFIX.md and PREFIX.png."
)
_REPORT_FORMATS = flags.DEFINE_list(
    "report_formats", ["jsonl", "md", "png"], "Which files --report writes."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA.value and not _TASKS.value:
        raise app.UsageError("give --data, --tasks, or both")
    if not _MODEL_DIR.value:
        raise app.UsageError("--model_dir names no model directory")
    common.check_list("model_dir", _MODEL_DIR.value)
    common.check_list("tasks", _TASKS.value)
    common.quiet_logs()
    common.init_distributed()
    import jax
    import jax.numpy as jnp

    from llama_jax import data, evals, formats, paths, sharding
    from llama_jax.errors import ConfigError
    from llama_jax.evals import load_task

    show = jax.process_index() == 0
    results = []
    # Everything about the inputs is checked before any model is read.
    inputs = [*_MODEL_DIR.value, _DATA.value, *_TASKS.value, _TOKENIZER.value]
    if _OUTPUT.value:
        paths.check_apart(_OUTPUT.value, inputs, flag="--output")
        paths.check_output_file(_OUTPUT.value, flag="--output")
    if _REPORT.value:
        for fmt in _REPORT_FORMATS.value:
            paths.check_apart(f"{_REPORT.value}.{fmt}", inputs, flag="--report")
        evals.check_report(_REPORT.value, _REPORT_FORMATS.value)
    documents = split = store_seq_len = None
    if _DATA.value and data.is_store(_DATA.value):
        if _FORMAT.value or _SPLIT.value or _STRIDE.value:
            raise ConfigError(
                f"--data={_DATA.value} is a token store: its rows are already packed, so "
                "--format, --split and --stride do not apply"
            )
        split, store_seq_len = "store", data.TokenStore(_DATA.value).seq_len
        if _SEQ_LEN.value and _SEQ_LEN.value != store_seq_len:
            raise ConfigError(
                f"--seq_len={_SEQ_LEN.value}, but the token store {_DATA.value} holds rows of "
                f"{store_seq_len} tokens"
            )
    elif _DATA.value:
        documents = evals.read_documents(
            _DATA.value, format=_FORMAT.value, field=_FIELD.value, split=_SPLIT.value
        )
        jsonl = evals.data_format(_DATA.value, _FORMAT.value) == "jsonl"
        split = "jsonl" if jsonl else (_SPLIT.value or "none")
    tasks = [load_task(path) for path in _TASKS.value]
    for task in tasks:
        task.check_fewshot(
            task.spec.num_fewshot if _NUM_FEWSHOT.value is None else _NUM_FEWSHOT.value
        )
    model_dirs = [formats.ModelDir.open(path) for path in _MODEL_DIR.value]
    if split == "store":
        # A store scored with another tokenizer's model means nothing: refuse it before loading.
        token_store = data.TokenStore(_DATA.value)
        for model_dir in model_dirs:
            if not _TOKENIZER.value and model_dir.tokenizer_path is None:
                continue
            tokenizer = formats.load_tokenizer(_TOKENIZER.value or model_dir)
            token_store.check(
                seq_len=store_seq_len,
                vocab_size=model_dir.config.vocab_size,
                tokenizer_path=tokenizer.path,
            )
    seq_len = (
        store_seq_len
        or _SEQ_LEN.value
        or min(min(d.config.max_position_embeddings for d in model_dirs), 2048)
    )
    suite = evals.Suite(
        documents=None if documents is None else tuple(documents),
        data=_DATA.value,
        split=split,
        tasks=tuple(tasks),
        seq_len=seq_len,
        batch_size=_BATCH_SIZE.value,
        stride=_STRIDE.value,
        add_bos=_ADD_BOS.value,
        add_eos=_ADD_EOS.value,
        num_fewshot=_NUM_FEWSHOT.value,
        details=_DETAILS.value,
    )

    def emit(_, result):
        results.append(result)
        if show:
            print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)

    rows = evals.evaluate_dirs(
        model_dirs,
        suite,
        mesh=sharding.create_mesh(**sharding.parse_mesh(_MESH.value)),
        dtype=jnp.dtype(_DTYPE.value),
        tokenizer=_TOKENIZER.value,
        on_result=emit,
        progress=lambda what: common.Progress(what, every_s=10),
    )
    if not show:
        return
    if len(rows) > 1:
        print("\n" + evals.markdown(rows), end="", flush=True)
    if _OUTPUT.value:
        # Written whole under a temporary name, then renamed: never half a file.
        tmp = f"{_OUTPUT.value}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        os.replace(tmp, _OUTPUT.value)
    if _REPORT.value:
        evals.write_report(rows, _REPORT.value, _REPORT_FORMATS.value)


if __name__ == "__main__":
    common.run(main)
