r"""Convert a Hugging Face LLaMA directory, or a LLaMA GGUF file, into a sharded Orbax
model directory.

  python -m convert.hf_to_orbax --hf_dir=/models/Llama-3.1-8B --out_dir=/ckpt/llama3.1-8b
  python -m convert.hf_to_orbax --hf_dir=... --out_dir=gs://bucket/m --mesh=fsdp=-1,tensor=4
  python -m convert.hf_to_orbax --hf_dir=... --out_dir=/ckpt/m-int8 --quantize=int8
  python -m convert.hf_to_orbax --gguf=/models/llama-3.2-1b-Q4_K_M.gguf --out_dir=/ckpt/m

Reads config.json, the tokenizer files and the safetensors (one file or an index of
shards), checks every tensor before writing anything, then builds each parameter
directly in its shards on the mesh (each host memory-maps and reads only the slices its
devices hold) and saves it with Orbax while the next one is read, so a host holds at
most two parameters' shards. The output directory (config.json, params/, tokenizer,
generation_config.json, metadata.json) is written under a temporary name and renamed
when complete. On a multi-host slice, run the same command on every host.

--gguf reads a LLaMA-architecture GGUF file instead (F32, F16, BF16, Q8_0, and the Q4 /
Q5 / K block types dequantized by the `gguf` package): the config and tokenizer come
from its metadata; 'auto' --dtype stores every value exactly (float32 for a quantized
file). Quantize the imported model our way with launch.quantize.
"""

from absl import app, flags

from launch import common

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Hugging Face model directory (config.json, safetensors)."
)
_GGUF = flags.DEFINE_string("gguf", None, "A LLaMA GGUF file to convert instead of --hf_dir.")
_OUT_DIR = common.out_dir_flag()
_MESH = common.mesh_flag("convert")
_RULES = flags.DEFINE_string(
    "rules", "", "Logical-axis rule overrides, e.g. 'vocab=fsdp,embed=' ('' replicates)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "bfloat16", "float32", "float16"],
    "Stored parameter dtype; 'auto' keeps the checkpoint's own.",
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", None, ["int8"], "Quantize the block projections while converting."
)
_QUANTIZE_HEAD = flags.DEFINE_bool(
    "quantize_head", False, "With --quantize: also the (untied) LM head."
)
_QUANTIZE_EMBED = flags.DEFINE_bool(
    "quantize_embed", False, "With --quantize: also the embedding table (and a tied head)."
)
_OVERWRITE = common.overwrite_flag()
flags.mark_flags_as_mutual_exclusive(["hf_dir", "gguf"], required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _GGUF.value is not None and (
        _QUANTIZE.value or _QUANTIZE_HEAD.value or _QUANTIZE_EMBED.value
    ):
        raise app.UsageError(
            "--quantize applies to --hf_dir; quantize an imported GGUF model with launch.quantize"
        )
    common.quiet_logs()
    common.init_distributed()
    from llama_jax import formats, sharding

    mesh = sharding.create_mesh(**sharding.parse_mesh(_MESH.value))
    rules = sharding.rules_from_config(sharding.parse_rules(_RULES.value))
    if _GGUF.value is None:
        out = formats.convert_hf(
            _HF_DIR.value,
            _OUT_DIR.value,
            mesh=mesh,
            rules=rules,
            dtype=_DTYPE.value,
            overwrite=_OVERWRITE.value,
            quantize=_QUANTIZE.value,
            quantize_head=_QUANTIZE_HEAD.value,
            quantize_embed=_QUANTIZE_EMBED.value,
            progress=common.Progress("converting"),
        )
    else:
        out = formats.import_gguf(
            _GGUF.value,
            _OUT_DIR.value,
            mesh=mesh,
            rules=rules,
            dtype=_DTYPE.value,
            overwrite=_OVERWRITE.value,
            progress=common.Progress("importing"),
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
