r"""Distil a teacher LLaMA into a smaller student from a config file.

  python -m launch.distill --config=configs/distill_tiny.py:/tmp/teacher --workdir=/tmp/kd
  python -m launch.distill --config=configs/distill_llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/kd --config.teacher.model_dir=/ckpt/llama3.2-1b

The teacher (`teacher.model_dir`) is any model directory: Hugging Face, converted, or
a training run. The student (`model`) starts random from a preset, from a model
directory, or from a subset of the teacher's layers (`model.teacher_layers`). Any
config field can be overridden with --config.SECTION.FIELD=VALUE; rerunning the same
command resumes from the latest complete checkpoint in <workdir>/checkpoints (with the
same teacher: another one is refused). The teacher is never saved.

The config also chooses: hidden-state matching (--config.distill.features="1:3,3:7"),
on-policy samples (--config.distill.on_policy.max_new_tokens=N with distill.alpha=1),
a cached teacher (--config.teacher.logits_dir=DIR from launch.teacher_logits), a LoRA
student (--config.lora.rank=R over model.model_dir), and a structured-pruned start
(the `structured` section; see configs/distill_minitron_tiny.py). This command is
launch.train's under another name: the config decides the recipe.

Multi-host: on TPU pods (and SLURM clusters) JAX finds its peers itself; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every host.
"""

from launch import common
from launch.train import main

if __name__ == "__main__":
    common.run(main)
