r"""Merge a LoRA run's adapters into its base and write a converted model directory.

  python -m launch.merge_lora --model_dir=/runs/lora --out_dir=/ckpt/merged

--model_dir is a LoRA training run (its latest complete step). The base is the one the
run's checkpoint records (or --base_dir, if it has moved); its fingerprint must match.
Each kernel becomes W + (alpha / rank) * A B; an int8 base is dequantized, so the
result is always a float model (quantize it again with launch.quantize). Every command
that reads a model also takes the run directory itself and merges on the fly; this
writes the merged model once.
"""

from absl import app, flags

from launch import common

_IO = common.model_to_model_flags(
    "A LoRA training run.", "merge", tokenizer_default="the run's or the base's"
)
# --help lists the shared flags beside this command's own.
flags.adopt_module_key_flags(common)
_BASE_DIR = flags.DEFINE_string(
    "base_dir", None, "The base model directory, if it moved (default: the recorded one)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "bfloat16", "float32", "float16"],
    "Dtype of the merged parameters; 'auto' is the base's float dtype.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    common.init_distributed()
    from llama_jax import formats, sharding

    out = formats.merge_lora_dir(
        _IO.model_dir.value,
        _IO.out_dir.value,
        mesh=sharding.create_mesh(**sharding.parse_mesh(_IO.mesh.value)),
        dtype=_DTYPE.value,
        base_dir=_BASE_DIR.value,
        tokenizer=_IO.tokenizer.value,
        overwrite=_IO.overwrite.value,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
