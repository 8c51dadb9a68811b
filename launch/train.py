r"""Train a LLaMA from a config file.

  python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
  python -m launch.train --config=configs/llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/run --config.train.steps=100 --config.mesh.fsdp=-1

The config chooses the run: full training, LoRA (a `lora` section with rank > 0), or
distillation (`teacher` and `distill` sections; launch.distill is the same command).
Any config field can be overridden with --config.SECTION.FIELD=VALUE. Rerunning the
same command resumes from the latest complete checkpoint in <workdir>/checkpoints.
Multi-host: on TPU pods (and SLURM clusters) JAX finds its peers itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file[:arg]: training, LoRA or distillation."
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: checkpoints (of the trained model), metrics.jsonl, TensorBoard events.",
    required=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    from llama_jax import distill

    cfg = distill.typed_config(_CONFIG.value)
    common.init_distributed()
    import jax

    last = distill.run(cfg, _WORKDIR.value)
    if jax.process_index() == 0 and last:
        print(f"final step metrics: loss={last.get('loss'):.4f}")


if __name__ == "__main__":
    common.run(main)
