"""Prune a tiny model and recover it by distillation: the student starts as a copy of
the teacher and is pruned to 50% on a gradual schedule while it learns from the
teacher, so the output is a sparse student that has recovered.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
python -m launch.distill --config=configs/distill_prune_tiny.py:/tmp/tiny --workdir=/tmp/kd50

The argument after ':' is the teacher's model directory (also the student's start).
For a one-shot N:M student use --config.prune.pattern=2:4 --config.prune.sparsity=0.5
--config.prune.schedule=one_shot.
"""

from configs import distill_tiny


def get_config(arg=None):
    c = distill_tiny.get_config(arg)
    c.model.overrides = ""
    c.model.model_dir = arg or ""
    c.distill.alpha = 1.0
    c.prune.sparsity = 0.5
    c.prune.schedule = "gradual"
    c.prune.start_step = 0
    c.prune.end_step = 150
    c.prune.update_every = 10
    return c
