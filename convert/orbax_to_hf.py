r"""Export a model directory as a Hugging Face directory that transformers loads.

  python -m convert.orbax_to_hf --model_dir=/ckpt/llama3.1-8b --out_dir=/models/export
  python -m convert.orbax_to_hf --model_dir=/runs/student --out_dir=/models/student \
      --dtype=bfloat16 --max_shard_size=2GB

--model_dir is any model directory: a converted one, a training or distillation workdir
(its latest complete step; the student, never a teacher), a LoRA run (its adapters
merged onto the base it recorded), or a Hugging Face one. Writes
sharded safetensors with model.safetensors.index.json, a transformers config.json,
generation_config.json and the tokenizer files, streaming one parameter at a time;
the directory is written under a temporary name and renamed when complete.
"""

from absl import app, flags

from launch import common

_MODEL_DIR = common.model_dir_flag("Model directory: converted, a training run, or Hugging Face.")
_OUT_DIR = common.out_dir_flag("Output Hugging Face directory.")
_MAX_SHARD = flags.DEFINE_string(
    "max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB or 500MB."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "bfloat16", "float32", "float16"],
    "Dtype of the written tensors; 'auto' keeps the stored one.",
)
_TOKENIZER = common.tokenizer_flag()
_OVERWRITE = common.overwrite_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    from llama_jax import formats

    out = formats.export_hf(
        _MODEL_DIR.value,
        _OUT_DIR.value,
        dtype=_DTYPE.value,
        max_shard_size=formats.parse_size(_MAX_SHARD.value),
        tokenizer=_TOKENIZER.value,
        overwrite=_OVERWRITE.value,
        progress=common.Progress("exporting"),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
