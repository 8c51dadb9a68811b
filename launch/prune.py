r"""Prune a model directory one-shot by weight magnitude.

  python -m launch.prune --model_dir=/ckpt/llama3.2-1b --out_dir=/ckpt/llama3.2-1b-50 \
      --sparsity=0.5
  python -m launch.prune --model_dir=/ckpt/llama3.2-1b --out_dir=/ckpt/llama3.2-1b-2of4 \
      --pattern=2:4

--model_dir is any float model directory (converted, a training run, Hugging Face).
The output is a converted model directory whose pruned weights are exactly zero, with
metadata.json "sparsity" holding the pattern, scope and the pruned fraction overall
and per layer. To recover the quality lost, distil into it with a `prune` block that
keeps the masks (configs/distill_prune_tiny.py shows the recipe).
"""

from absl import app, flags

from launch import common

_IO = common.model_to_model_flags("Float model directory.", "prune")
# --help lists the shared flags beside this command's own.
flags.adopt_module_key_flags(common)
_SPARSITY = flags.DEFINE_float(
    "sparsity",
    None,
    "Fraction of the pruned weights to zero, in [0, 1). Default 0.5; with --pattern=N:M "
    "it is (M - N) / M.",
)
_PATTERN = flags.DEFINE_string(
    "pattern", "unstructured", "'unstructured' or N:M (N kept of every M along the input axis)."
)
_SCOPE = flags.DEFINE_enum(
    "scope",
    "global",
    ["global", "per_layer"],
    "One magnitude threshold over every pruned matrix, or one per layer's matrix.",
)
_INCLUDE = flags.DEFINE_string(
    "include",
    None,
    "Regex over the prunable kernels' paths (default: every block projection; the LM "
    "head is 'lm_head.kernel'; embeddings and norms are never pruned).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    common.init_distributed()
    from llama_jax import prune, sharding, transforms

    with common.clear_errors():
        sparsity = _SPARSITY.value
        if sparsity is None:
            sparsity = 0.5 if prune.parse_pattern(_PATTERN.value) is None else 0.0
        options = dict(sparsity=sparsity, pattern=_PATTERN.value, scope=_SCOPE.value)
        if _INCLUDE.value is not None:
            options["include"] = _INCLUDE.value
        out, record = transforms.prune_dir(
            _IO.model_dir.value,
            _IO.out_dir.value,
            prune.PruneConfig(**options),
            mesh=sharding.create_mesh(**sharding.parse_mesh(_IO.mesh.value)),
            tokenizer=_IO.tokenizer.value,
            overwrite=_IO.overwrite.value,
        )
    print(f"wrote {out}: {100 * record['overall']:.2f}% of the pruned kernels are zero")


if __name__ == "__main__":
    app.run(main)
