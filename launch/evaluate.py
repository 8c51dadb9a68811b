r"""Evaluate a model directory: perplexity of a text or JSONL file, and task files.

  python -m launch.evaluate --model_dir=DIR --data=held_out.txt --seq_len=1024
  python -m launch.evaluate --model_dir=DIR --data=eval.jsonl --field=text
  python -m launch.evaluate --model_dir=DIR --num_fewshot=3 \
      --tasks=configs/tasks/arithmetic_mc.jsonl,configs/tasks/word_echo_generate.jsonl

--model_dir is any model directory (converted, a training run, Hugging Face). Prints one
JSON line per result on stdout: first the perplexity of --data ({"data", "perplexity",
"loss", "tokens", ...}), then one line per task file ({"task", "type", "num_fewshot", "n",
"metrics"}). --output writes the same lines to a file, with every example's prompt, scores
and prediction under "examples" when --details is set. The task file format and the
scoring rules are described in llama_jax/tasks.py,
llama_jax/evaluate.py and llama_jax/perplexity.py. Progress goes to stderr.
"""

import json
import os

from absl import app, flags

from launch import common

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Model directory: converted, Hugging Face, or a training run.", required=True
)
_DATA = flags.DEFINE_string("data", None, "Text or JSONL file to measure perplexity on.")
_FORMAT = flags.DEFINE_enum(
    "format", None, ["text", "jsonl"], "Format of --data (default: jsonl for .jsonl/.json)."
)
_FIELD = flags.DEFINE_string("field", "text", "JSONL key holding each document.")
_TASKS = flags.DEFINE_list("tasks", [], "Task files (JSONL), comma-separated.")
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "Few-shot examples per prompt (default: each task's own).", lower_bound=0
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len",
    None,
    "Longest token sequence the model sees (default: max_position_embeddings, at most 2048).",
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
    "tokenizer", None, "Tokenizer directory or file (default: the model directory's own)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON lines to this file.")
_DETAILS = flags.DEFINE_bool("details", False, "Per-example results in --output.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATA.value and not _TASKS.value:
        raise app.UsageError("give --data, --tasks, or both")
    common.quiet_logs()
    common.init_distributed()
    import jax
    import jax.numpy as jnp

    from llama_jax import evaluate, model_dir, perplexity, sharding
    from llama_jax.tasks import load_task

    show = jax.process_index() == 0
    with common.clear_errors():
        # Everything about the inputs is checked before the model is read.
        out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value)) if _OUTPUT.value else None
        if out_dir is not None and not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--output={_OUTPUT.value}: directory {out_dir} does not exist")
        documents = None
        if _DATA.value:
            documents = perplexity.read_documents(
                _DATA.value, format=_FORMAT.value, field=_FIELD.value
            )
        tasks = [load_task(path) for path in _TASKS.value]
        for task in tasks:
            task.check_fewshot(
                task.spec.num_fewshot if _NUM_FEWSHOT.value is None else _NUM_FEWSHOT.value
            )
        config = model_dir.read_config(_MODEL_DIR.value)
        seq_len = _SEQ_LEN.value or min(config.max_position_embeddings, 2048)
        tokenizer = model_dir.load_tokenizer(_TOKENIZER.value or _MODEL_DIR.value)
        mesh = sharding.create_mesh(**sharding.parse_mesh(_MESH.value))
        evaluate.check_setup(config, tokenizer, seq_len, _BATCH_SIZE.value, mesh)
        model, _ = model_dir.load_model(_MODEL_DIR.value, dtype=jnp.dtype(_DTYPE.value), mesh=mesh)
        common_args = dict(batch_size=_BATCH_SIZE.value, mesh=mesh)
        results = []
        if documents is not None:
            ppl = perplexity.eval_perplexity(
                model,
                tokenizer,
                documents,
                seq_len=seq_len,
                progress=common.Progress("perplexity rows", every_s=10),
                **common_args,
            )
            results.append({"data": _DATA.value, **ppl})
            _emit(results[-1], show)
        for task in tasks:
            results.append(
                evaluate.eval_task(
                    model,
                    tokenizer,
                    task,
                    num_fewshot=_NUM_FEWSHOT.value,
                    max_len=seq_len,
                    details=_DETAILS.value,
                    progress=common.Progress(task.spec.name, every_s=10),
                    **common_args,
                )
            )
            _emit(results[-1], show)
    if _OUTPUT.value and show:
        # Written whole under a temporary name, then renamed: never half a file.
        tmp = f"{_OUTPUT.value}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        os.replace(tmp, _OUTPUT.value)


def _emit(result, show: bool) -> None:
    if show:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)


if __name__ == "__main__":
    app.run(main)
