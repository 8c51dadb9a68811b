"""A tiny model that learns the bundled generated-English corpus on a CPU in a minute.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
"""

import os

from configs.base import base_config

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def get_config(arg=None):
    c = base_config()
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.data.path = os.path.join(DATA, "tiny_corpus.txt")
    c.data.tokenizer = DATA
    c.data.seq_len = 128
    c.data.global_batch = 16
    c.train.steps = 300
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0
    c.train.loss_chunk = 64
    c.train.log_every = 25
    c.checkpoint.save_every = 100
    return c
