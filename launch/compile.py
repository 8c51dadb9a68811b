r"""Compile a run's step ahead of time for a TPU slice and report its HBM per chip.

  python -m launch.compile --config=configs/llama3_8b_pod.py --topology=v5p-64
  python -m launch.compile --config=configs/distill_llama3_8b_pod.py --topology=v6e-64 \
      --config.train.grad_accum=4 --json=/tmp/kd_v6e.json
  python -m launch.compile --config=configs/tiny.py --topology=v5p:2x2x1 --num_slices=2

Builds the step that launch.train or launch.distill would run for --config (training,
LoRA with the frozen base as an argument, or distillation with the teacher as an
argument: the same step function, shardings, donation and gradient accumulation),
from shapes alone: no data and no checkpoint is read. Model shapes come from
model.preset and model.overrides, or from model.model_dir / teacher.model_dir when
they can be read here; otherwise the teacher's from teacher.preset. Any config field
can be overridden with --config.SECTION.FIELD=VALUE.

The TPU compiler (libtpu: pip install 'jax[tpu]') compiles it for --topology on this
host, which needs no TPU. --topology takes Cloud TPU names (v4-32 and v5p-64 count
TensorCores, two per chip: 16 and 32 chips; v5e-16 and v6e-64 count chips) or libtpu
topologies (v5p:2x4x4, v6e:8x8, v5e:4x4, v4:2x2x4). With --num_slices=N each slice is
that topology and the mesh's dcn axis is N. On a TPU host --topology may be left out:
the step is compiled for this host's own chips.

Printed per chip: HBM for the parameters, optimizer state, teacher or frozen base,
batch (each from its shards' shapes, padded to the compiled layouts' tiles; their sum
is XLA's argument size) and XLA's temporaries and generated code; the total against
the chip's HBM (v5p 95.74 GiB, v6e 31.25 GiB, v5e 15.75 GiB, v4 32 GiB, or what an
attached chip reports) and the headroom; the compile time; and the count of each
collective in the compiled HLO. --json=PATH writes the same figures.

Exit status 2, with an `error:` message, when the step does not fit (the message names
what to change: per-chip batch and train.grad_accum, model.remat_policy, the mesh,
train.loss_chunk, with this config's numbers), for an unknown topology, or for a mesh
or batch the chips do not divide.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file[:arg] (training, LoRA or distillation)."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "TPU slice to compile for: v5p-64, v6e-64, v5e-16, v4-32, or v5p:2x4x4 etc. "
    "Default: this host's TPUs.",
)
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Slices of --topology, joined by the mesh's dcn axis."
)
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/llama3_8b_pod.py")
    common.quiet_logs()
    import jax

    from llama_jax import distill, tpu, train

    cfg = distill.typed_config(_CONFIG.value)
    if _TOPOLOGY.value:
        target = tpu.tpu_target(_TOPOLOGY.value, _NUM_SLICES.value)
    else:
        common.init_distributed()
        target = tpu.local_target()
    report = tpu.compile_config(cfg, target)
    if jax.process_index() == 0:
        print(report.table(), flush=True)
        if _JSON.value:
            train.write_json(_JSON.value, report.to_dict())
    report.check_fits()


if __name__ == "__main__":
    common.run(main)
