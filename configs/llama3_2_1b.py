"""LLaMA 3.2 1B shape on one GPU, from random weights or a converted checkpoint.

  python -m launch.train --config=configs/llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/run1 --config.data.tokenizer=/models/Llama-3.2-1B \
      [--config.model.model_dir=/models/Llama-3.2-1B]

The argument after ':' is the JSONL training file (field "text").
"""

from configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.preset = "llama3.2-1b"
    c.model.remat_policy = "dots_no_batch"
    c.data.path = arg or ""
    c.data.format = "jsonl"
    c.data.seq_len = 2048
    c.data.global_batch = 8
    c.train.steps = 10000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 500
    c.checkpoint.save_every = 1000
    return c
