r"""Write a model directory as one GGUF file for llama.cpp (llama-cli, ollama, LM Studio).

  python -m convert.to_gguf --model_dir=/runs/student --out=student.gguf --type=q8_0
  python -m convert.to_gguf --model_dir=/ckpt/llama3.1-8b --out=llama.gguf --type=bf16
  llama-cli -m student.gguf -p "def fib(n):"

--model_dir is any model directory: a converted one, a training or distillation workdir
(its latest complete step), a LoRA run (merged onto its base on the fly), a pruned
student, an int8 directory (dequantized, then packed as Q8_0 blocks), or a Hugging Face
one. --type: f32, f16, bf16 or q8_0 for the matrices (norms, biases and RoPE factors
stay F32); 'auto' keeps the stored float type, and q8_0 for an int8 directory. The
metadata (architecture, RoPE, tokenizer with its merges or SentencePiece scores,
special tokens, chat template) is what llama.cpp's own converter writes for LLaMA.
The file is written one tensor at a time under a temporary name, renamed when
complete. Read a GGUF file back with `convert.hf_to_orbax --gguf=FILE`.
"""

import os

from absl import app, flags

from launch import common

_MODEL_DIR = common.model_dir_flag("Model directory: converted, a run, LoRA, int8 or Hugging Face.")
_OUT = flags.DEFINE_string("out", None, "Output GGUF file, e.g. student.gguf.", required=True)
_TYPE = flags.DEFINE_enum(
    "type",
    "auto",
    ["auto", "f32", "f16", "bf16", "q8_0"],
    "Tensor type of the matrices; 'auto' keeps the stored one (q8_0 for int8).",
)
_TOKENIZER = common.tokenizer_flag("embed")
_OVERWRITE = common.overwrite_flag("--out")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    from llama_jax import formats

    out = formats.export_gguf(
        _MODEL_DIR.value,
        _OUT.value,
        kind=_TYPE.value,
        tokenizer=_TOKENIZER.value,
        overwrite=_OVERWRITE.value,
        progress=common.Progress("writing GGUF"),
    )
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    common.run(main)
