r"""Quantize a model directory's block projections to int8 (weight-only, per channel).

  python -m launch.quantize --model_dir=/ckpt/llama3.1-8b --out_dir=/ckpt/llama3.1-8b-int8

--model_dir is any float model directory (converted, a training run, Hugging Face);
the output is a converted model directory with metadata.json "quantization": "int8"
that launch.generate and distillation (as a teacher) load directly. To quantize while
converting from Hugging Face, use `convert.hf_to_orbax --quantize=int8` instead.
"""

from absl import app, flags

from launch import common

_IO = common.model_to_model_flags("Float model directory.", "quantize")
# --help lists the shared flags beside this command's own.
flags.adopt_module_key_flags(common)
_MODE = flags.DEFINE_string("mode", "int8", "Quantization mode: int8.")
_HEAD = flags.DEFINE_bool("quantize_head", False, "Also the (untied) LM head.")
_EMBED = flags.DEFINE_bool("quantize_embed", False, "Also the embedding table (and a tied head).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    common.init_distributed()
    from llama_jax import formats, sharding

    out = formats.quantize_dir(
        _IO.model_dir.value,
        _IO.out_dir.value,
        mode=_MODE.value,
        quantize_head=_HEAD.value,
        quantize_embed=_EMBED.value,
        mesh=sharding.create_mesh(**sharding.parse_mesh(_IO.mesh.value)),
        tokenizer=_IO.tokenizer.value,
        overwrite=_IO.overwrite.value,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
