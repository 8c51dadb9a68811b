r"""Prune a model directory: one-shot by weight magnitude, or structurally into a smaller
dense model.

  python -m launch.prune --model_dir=/ckpt/llama3.2-1b --out_dir=/ckpt/llama3.2-1b-50 \
      --sparsity=0.5
  python -m launch.prune --model_dir=/ckpt/llama3.2-1b --out_dir=/ckpt/llama3.2-1b-2of4 \
      --pattern=2:4
  python -m launch.prune --structured --model_dir=/ckpt/llama3.1-8b \
      --out_dir=/ckpt/llama3.1-8b-width --embed_dim=3072 --mlp_dim=9216 \
      --calibration_data=/data/calib.jsonl [--dry_run]

--model_dir is any float model directory (converted, a training run, Hugging Face).

Magnitude: the output is a converted model directory whose pruned weights are exactly
zero, with metadata.json "sparsity" holding the pattern, scope and the pruned fraction
overall and per layer. To recover the quality lost, distil into it with a `prune`
block that keeps the masks (configs/distill_prune_tiny.py shows the recipe).

Structured (--structured): heads, MLP channels, embedding channels and layers are
ranked by their activations on --calibration_data, and the least important are sliced
away to the target sizes given (--num_layers, --num_heads, --num_kv_heads, --mlp_dim,
--embed_dim; any subset). The output is a smaller dense converted model directory
with metadata.json "structured" and importance.npz (every score and kept index).
--dry_run prints the target parameter count and the ranking and writes nothing (no
--out_dir needed). Distil from the unpruned model to recover
(configs/distill_minitron_tiny.py).
"""

from absl import app, flags

from launch import common

_IO = common.model_to_model_flags("Float model directory.", "prune", out_required=False)
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
_MAGNITUDE = (_SPARSITY, _PATTERN, _SCOPE, _INCLUDE)

_STRUCTURED = flags.DEFINE_bool(
    "structured", False, "Slice heads, channels and layers away instead of zeroing weights."
)
_TARGETS = {
    name: flags.DEFINE_integer(name, None, f"Structured: target {what} (default: the source's).")
    for name, what in (
        ("num_layers", "layers L"),
        ("num_heads", "query heads N (GQA groups stay whole)"),
        ("num_kv_heads", "key/value heads K"),
        ("mlp_dim", "MLP hidden size F"),
        ("embed_dim", "model width D"),
    )
}
_CAL_DATA = flags.DEFINE_string(
    "calibration_data", None, "Structured: a text, JSONL or .npy tokens file to score on."
)
_CAL_FORMAT = flags.DEFINE_enum(
    "calibration_format",
    "",
    ["", "text", "jsonl", "tokens"],
    "Structured: the calibration file's format ('': .jsonl/.json, .npy, else text).",
)
_CAL_FIELD = flags.DEFINE_string("calibration_field", "text", "Structured: the JSONL text key.")
_CAL_BATCHES = flags.DEFINE_integer("calibration_batches", 16, "Structured: batches scored.")
_CAL_BATCH = flags.DEFINE_integer("calibration_batch_size", 8, "Structured: rows per batch.")
_CAL_SEQ = flags.DEFINE_integer("calibration_seq_len", 1024, "Structured: tokens per row.")
_SEQ_AGG = flags.DEFINE_enum(
    "seq_aggregation", "mean", ["mean", "l2"], "Structured: over the tokens of a row."
)
_BATCH_AGG = flags.DEFINE_enum(
    "batch_aggregation", "l2", ["mean", "l2"], "Structured: over the rows."
)
_LAYER_METRIC = flags.DEFINE_enum(
    "layer_metric",
    "ppl",
    ["ppl", "block_influence"],
    "Structured: rank layers by the loss increase when each is skipped (one forward per "
    "layer), or by block influence 1 - cos(input, output).",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Structured: print the target size and the ranking; write nothing."
)
_STRUCTURED_ONLY = (
    *_TARGETS.values(),
    _CAL_DATA,
    _CAL_FORMAT,
    _CAL_FIELD,
    _CAL_BATCHES,
    _CAL_BATCH,
    _CAL_SEQ,
    _SEQ_AGG,
    _BATCH_AGG,
    _LAYER_METRIC,
    _DRY_RUN,
)


def _present(holders) -> list[str]:
    return [f"--{h.name}" for h in holders if flags.FLAGS[h.name].present]


def run_magnitude(mesh) -> None:
    from llama_jax import compress, formats

    sparsity = _SPARSITY.value
    if sparsity is None:
        sparsity = 0.5 if compress.parse_pattern(_PATTERN.value) is None else 0.0
    options = dict(sparsity=sparsity, pattern=_PATTERN.value, scope=_SCOPE.value)
    if _INCLUDE.value is not None:
        options["include"] = _INCLUDE.value
    out, record = formats.prune_dir(
        _IO.model_dir.value,
        _IO.out_dir.value,
        compress.PruneConfig(**options),
        mesh=mesh,
        tokenizer=_IO.tokenizer.value,
        overwrite=_IO.overwrite.value,
    )
    print(f"wrote {out}: {100 * record['overall']:.2f}% of the pruned kernels are zero")


def run_structured(mesh) -> None:
    from llama_jax import compress, formats
    from llama_jax.errors import ConfigError

    for name, holder in _TARGETS.items():
        if holder.value is not None and holder.value < 1:
            raise ConfigError(
                f"--{name}={holder.value}: a target size is at least 1 (leave the flag out "
                "to keep the source's)"
            )
    spec = compress.StructuredConfig(
        **{name: holder.value or 0 for name, holder in _TARGETS.items()},
        calibration_data=_CAL_DATA.value or "",
        calibration_format=_CAL_FORMAT.value,
        calibration_field=_CAL_FIELD.value,
        calibration_batches=_CAL_BATCHES.value,
        calibration_batch_size=_CAL_BATCH.value,
        calibration_seq_len=_CAL_SEQ.value,
        seq_aggregation=_SEQ_AGG.value,
        batch_aggregation=_BATCH_AGG.value,
        layer_metric=_LAYER_METRIC.value,
    )
    pruned = formats.structured_prune_dir(
        _IO.model_dir.value,
        _IO.out_dir.value,
        spec,
        mesh=mesh,
        tokenizer=_IO.tokenizer.value,
        overwrite=_IO.overwrite.value,
        dry_run=_DRY_RUN.value,
        progress=common.Progress("scoring layers (one pass each without it)"),
    )
    print(compress.describe(pruned))
    if not _DRY_RUN.value:
        print(f"wrote {_IO.out_dir.value}: {pruned.config.num_params():,} parameters")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _STRUCTURED.value and _present(_MAGNITUDE):
        raise app.UsageError(f"{_present(_MAGNITUDE)} are magnitude options; not --structured")
    if not _STRUCTURED.value and _present(_STRUCTURED_ONLY):
        raise app.UsageError(f"{_present(_STRUCTURED_ONLY)} need --structured")
    if _IO.out_dir.value is None and not (_STRUCTURED.value and _DRY_RUN.value):
        raise app.UsageError("--out_dir is required (only --structured --dry_run writes nothing)")
    common.quiet_logs()
    common.init_distributed()
    from llama_jax import sharding

    mesh = sharding.create_mesh(**sharding.parse_mesh(_IO.mesh.value))
    (run_structured if _STRUCTURED.value else run_magnitude)(mesh)


if __name__ == "__main__":
    common.run(main)
