r"""Run a teacher once over a distillation config's data and store its top-k logits.

  python -m launch.teacher_logits --config=configs/distill_tiny.py --teacher=/tmp/tiny \
      --out_dir=/tmp/tiny_logits --top_k=64

Then distil from the cache instead of the live teacher:

  python -m launch.distill --config=configs/distill_tiny.py:/tmp/tiny --workdir=/tmp/kd \
      --config.teacher.logits_dir=/tmp/tiny_logits

The cache holds, for each position of the first --steps global batches (default
train.steps) in the order the distillation run reads them, the teacher's --top_k most
likely token ids, their log-probabilities at temperature 1 (within 1/256 nat) and the
log of the remaining mass: 234 bytes per token at k = 64 for a 128256-token vocabulary
(format: llama_jax/distill/cache.py). The teacher runs on the config's mesh and sharding
rules; each host writes its own rows. Rerunning the same command resumes a killed run
at its first missing shard, and a larger --steps extends the cache; a cache written
with another teacher, other data settings or another layout is refused.
Multi-host: on TPU pods (and SLURM clusters) JAX finds its peers itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/distill_*.py file[:arg].")
_TEACHER = flags.DEFINE_string(
    "teacher",
    None,
    "The teacher's model directory, local or gs:// (default: the config's teacher.model_dir).",
)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "The cache directory.", required=True)
_TOP_K = flags.DEFINE_integer("top_k", 64, "Tokens kept per position.")
_STEPS = flags.DEFINE_integer("steps", None, "Global batches to cache (default: train.steps).")
_STEPS_PER_SHARD = flags.DEFINE_integer(
    "steps_per_shard", 0, "Steps per shard file (0: about 256 MB per file)."
)
_CHUNK = flags.DEFINE_integer(
    "chunk", 0, "Positions whose logits are made at once (0: about 256 MB per device)."
)
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps between progress lines.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/distill_tiny.py")
    config = _CONFIG.value
    from llama_jax import distill

    if _TEACHER.value:
        if "teacher" not in config:
            raise app.UsageError("--teacher needs a distillation config (configs/distill_*.py)")
        config.teacher.model_dir = _TEACHER.value
    cfg = distill.DistillConfig.of(config)
    common.init_distributed()
    common.quiet_logs()

    distill.write_teacher_logits(
        cfg,
        _OUT_DIR.value,
        top_k=_TOP_K.value,
        steps=_STEPS.value,
        steps_per_shard=_STEPS_PER_SHARD.value,
        chunk=_CHUNK.value,
        log_every=_LOG_EVERY.value,
    )


if __name__ == "__main__":
    common.run(main)
