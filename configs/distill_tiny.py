"""Distil a tiny teacher (trained with configs/tiny.py) into a 2-layer student on the
bundled corpus, on a CPU in a minute.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
python -m launch.distill --config=configs/distill_tiny.py:/tmp/tiny --workdir=/tmp/kd

The argument after ':' is the teacher's model directory. Data and optimizer settings
are configs/tiny.py's.
"""

from configs import tiny
from configs.base import with_distillation


def get_config(arg=None):
    c = with_distillation(tiny.get_config())
    c.teacher.model_dir = arg or ""
    c.teacher.dtype = "float32"
    c.model.overrides = dict(
        embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, num_layers=2
    )
    c.train.steps = 200
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    return c
