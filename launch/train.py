r"""Train a LLaMA from a config file.

  python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
  python -m launch.train --config=configs/llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/run --config.train.steps=100 --config.mesh.fsdp=-1

Any config field can be overridden with --config.SECTION.FIELD=VALUE. Rerunning the
same command resumes from the latest complete checkpoint in <workdir>/checkpoints.
Multi-host: on TPU pods (and SLURM clusters) JAX finds its peers itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file[:arg].")
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: checkpoints, metrics.jsonl, TensorBoard events.",
    required=True,
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-host runs off TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
            raise app.UsageError(
                "multi-host needs all of --coordinator_address, --num_processes, --process_id"
            )
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        # Must run before anything touches a backend. On TPU pods (and clusters JAX
        # recognises, e.g. SLURM) this finds the peers; elsewhere it says there is no
        # coordinator, and the run is a single process.
        try:
            jax.distributed.initialize()
        except ValueError as e:
            logging.info("single-process run (%s)", e)

    from llama_jax import train

    last = train.run(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0 and last:
        print(f"final step metrics: loss={last.get('loss'):.4f}")


if __name__ == "__main__":
    app.run(main)
