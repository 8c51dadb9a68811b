"""LLaMA 3 8B on a TPU pod slice (v5p-64 or v6e-64): FSDP over every chip.

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="
    cd llama_jax && python -m launch.train --config=configs/llama3_8b_pod.py:gs://b/store \
      --workdir=/gcs/b/runs/8b"

The argument after ':' is a token store of 8192-token rows (launch.prepare_data).

Memory per chip (python -m launch.compile --config=configs/llama3_8b_pod.py
--topology=v5p-64, or v6e-64): 49.3 of 95.74 GiB on v5p-64 (8 rows of 8192 tokens per
chip) and 23.7 of 31.25 GiB on v6e-64 (4 rows). Keeping the projections' outputs for
the backward pass (remat dots_no_batch) costs about 23 GiB per row of 8192 tokens on a
chip, more than a v6e chip holds beside the rest even at one row per microbatch
(32.0 GiB with grad_accum 4), so the blocks recompute their forward pass (remat full)
and keep only their inputs. On v5p alone, --config.model.remat_policy=dots_no_batch
--config.train.grad_accum=4 (2 rows per chip per microbatch, about 56 GiB) also fits
and recomputes less.
"""

from configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.model.preset = "llama3-8b"
    c.model.remat_policy = "full"
    c.mesh.fsdp = -1
    c.data.path = arg or ""
    c.data.format = "store"
    c.data.seq_len = 8192
    c.data.global_batch = 256
    c.train.grad_accum = 1
    c.train.steps = 20000
    c.train.learning_rate = 1.5e-4
    c.train.warmup_steps = 2000
    c.train.loss_chunk = 1024
    c.checkpoint.save_every = 500
    return c
