"""LLaMA 3 8B teacher -> LLaMA 3.2 1B student on a TPU pod slice (v5p-64 or v6e-64).

  python -m launch.distill --config=configs/distill_llama3_8b_pod.py:gs://$BUCKET/store \
      --workdir=/gcs/$BUCKET/runs/kd-1b --config.teacher.model_dir=gs://$BUCKET/llama3-8b \
      --config.model.model_dir=gs://$BUCKET/llama3.2-1b

The argument after ':' is a token store of 8192-token rows (launch.prepare_data). Teacher
and student are both sharded over every chip (fsdp=-1); for several slices set
--config.mesh.dcn=<slices>. Starting the student from the converted LLaMA 3.2 1B (same
vocabulary as LLaMA 3 8B) is the usual recipe; drop model_dir to start from random.

Memory per chip (python -m launch.compile --config=configs/distill_llama3_8b_pod.py
--topology=v5p-64, or v6e-64; teacher.preset gives the teacher's shapes where
teacher.model_dir cannot be read): 39.7 of 95.74 GiB on v5p-64 and 20.7 of 31.25 GiB on
v6e-64. The student keeps its projections' outputs (remat dots_no_batch), about 9-10
GiB per row of 8192 tokens on a chip; two microbatches (grad_accum 2) make that 4 rows
per chip on v5p-64 and 2 on v6e-64, where one pass of 4 rows would not fit. The teacher
runs forward only and keeps no activations.
"""

from configs.base import distill_config


def get_config(arg=None):
    c = distill_config()
    c.teacher.dtype = "bfloat16"
    c.teacher.preset = "llama3-8b"
    c.model.preset = "llama3.2-1b"
    c.model.remat_policy = "dots_no_batch"
    c.mesh.fsdp = -1
    c.data.path = arg or ""
    c.data.format = "store"
    c.data.seq_len = 8192
    c.data.global_batch = 256
    c.train.grad_accum = 2
    c.train.steps = 20000
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 1000
    c.checkpoint.save_every = 500
    c.distill.kind = "forward_kl"
    c.distill.alpha = 0.8
    c.distill.temperature = 1.0
    return c
