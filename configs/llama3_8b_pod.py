"""LLaMA 3 8B on a TPU pod slice (e.g. v5p-64 or v6e-64): FSDP over every chip.

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="
    cd llama_jax && python -m launch.train --config=configs/llama3_8b_pod.py:gs://b/train.npy \
      --workdir=/gcs/b/runs/8b"

The argument after ':' is a pre-tokenized 2-D .npy of [rows, 8192] token rows.
"""

from configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.preset = "llama3-8b"
    c.model.remat_policy = "dots_no_batch"
    c.mesh.fsdp = -1
    c.data.path = arg or ""
    c.data.format = "tokens"
    c.data.seq_len = 8192
    c.data.global_batch = 256
    c.train.steps = 20000
    c.train.learning_rate = 1.5e-4
    c.train.warmup_steps = 2000
    c.train.loss_chunk = 2048
    c.checkpoint.save_every = 500
    return c
