"""Distil a tiny teacher (trained with configs/tiny.py) into a 2-layer student on the
bundled corpus, on a CPU in a minute.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
python -m launch.distill --config=configs/distill_tiny.py:/tmp/tiny --workdir=/tmp/kd

The argument after ':' is the teacher's model directory.
"""

import os

from configs.base import distill_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = distill_config()
    c.teacher.model_dir = arg or ""
    c.teacher.dtype = "float32"
    c.model.preset = "tiny"
    c.model.overrides = "embed_dim=32,num_heads=4,num_kv_heads=2,head_dim=8,mlp_dim=64,num_layers=2"
    c.model.dtype = "float32"
    c.data.path = os.path.join(DATA, "tiny_corpus.txt")
    c.data.tokenizer = DATA
    c.data.seq_len = 128
    c.data.global_batch = 16
    c.train.steps = 200
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0
    c.train.loss_chunk = 64
    c.train.log_every = 25
    c.checkpoint.save_every = 100
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    return c
