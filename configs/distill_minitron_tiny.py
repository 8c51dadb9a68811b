"""Prune a tiny teacher in width by its activations, then distil it back (the Minitron
recipe), on a CPU in a minute or two.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
python -m launch.distill --config=configs/distill_minitron_tiny.py:/tmp/tiny \
    --workdir=/tmp/minitron

The argument after ':' is the teacher's model directory. At start-up the teacher's
heads, MLP channels and embedding channels are ranked on `structured.calibration_*`
(empty calibration_data: the run's own data) and sliced to the `structured` targets;
that pruned model is the student's starting point, saved once with the run
(<workdir>/pruned_student) so a resume does not prune again. The student then learns
from the unpruned teacher. The tiny teacher (D=48, N=6, K=2, F=94, L=3) becomes D=36,
N=4 (two query heads per kv head), F=64: about 40% of its parameters go.
"""

from configs import distill_tiny
from configs.base import structured_section

# The student's shape: the teacher's, less what `structured` removes.
TARGETS = dict(embed_dim=36, num_heads=4, mlp_dim=64)


def get_config(arg=None):
    c = distill_tiny.get_config(arg)
    c.structured = structured_section(
        **TARGETS, calibration_batches=4, calibration_batch_size=8, calibration_seq_len=128
    )
    # The same shape written as preset overrides, so the step also compiles ahead of
    # time (launch.compile) where the teacher directory cannot be read.
    c.model.overrides = dict(TARGETS)
    c.train.steps = 200
    c.train.learning_rate = 1e-3
    c.distill.alpha = 1.0
    c.distill.temperature = 1.0
    return c
