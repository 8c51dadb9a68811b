"""LLaMA 3.2 1B teacher -> a ~300M student on one GPU.

  python -m convert.hf_to_orbax --hf_dir=/models/Llama-3.2-1B --out_dir=/ckpt/llama3.2-1b
  python -m launch.distill --config=configs/distill_llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/kd-300m --config.teacher.model_dir=/ckpt/llama3.2-1b \
      --config.data.tokenizer=/ckpt/llama3.2-1b

The argument after ':' is the JSONL training file (field "text"). The student keeps the
teacher's vocabulary (128256) with width-1024 blocks: 12 layers, 16 heads, 4 KV heads.
"""

from configs.base import distill_config


def get_config(arg=None):
    c = distill_config()
    c.teacher.dtype = "bfloat16"
    c.model.preset = "llama3.2-1b"
    c.model.overrides = dict(
        embed_dim=1024, num_layers=12, num_heads=16, num_kv_heads=4, head_dim=64, mlp_dim=4096
    )
    c.model.remat_policy = "dots_no_batch"
    c.data.path = arg or ""
    c.data.format = "jsonl"
    c.data.seq_len = 2048
    c.data.global_batch = 8
    c.train.steps = 20000
    c.train.learning_rate = 6e-4
    c.train.warmup_steps = 1000
    c.checkpoint.save_every = 1000
    c.distill.kind = "forward_kl"
    c.distill.alpha = 0.5
    c.distill.temperature = 1.0
    return c
