"""LLaMA 3.1 8B -> ~4.5B on a TPU pod slice (v5p-64 or v6e-64): width-prune the teacher
by its activations, then distil from the unpruned teacher (Minitron's Llama-3.1 8B ->
4B-Width recipe: D 4096 -> 3072, MLP 14336 -> 9216, heads and layers kept).

  python -m launch.distill \
      --config=configs/distill_minitron_llama3_8b_pod.py:gs://$BUCKET/store \
      --workdir=/gcs/$BUCKET/runs/minitron-4b --config.teacher.model_dir=gs://$BUCKET/llama3.1-8b

The argument after ':' is a token store of 8192-token rows (launch.prepare_data), also the
calibration data (1024 rows, as in the paper). The student (4.51B parameters, untied,
the teacher's vocabulary and RoPE) is pruned once at start-up on the pod, sharded
like the teacher, and saved in <workdir>/pruned_student. Loss and schedule follow
the paper: logit KD only, peak learning rate 1e-4 with cosine decay. Both models are
sharded over every chip (fsdp=-1); the student recomputes its blocks (remat full).

Memory per chip of the distillation step (python -m launch.compile
--config=configs/distill_minitron_llama3_8b_pod.py --topology=v5p-64, or v6e-64;
teacher.preset gives the teacher's shapes where teacher.model_dir cannot be read): 39.0
of 95.74 GiB on v5p-64 (8 rows of 8192 tokens per chip) and 20.4 of 31.25 GiB on
v6e-64 (4 rows). Pruning at start-up runs before the step exists: forward passes of
the teacher over 64-row calibration batches (2 rows per chip on v5p-64, 1 on v6e-64)
and one parameter sliced at a time, both far inside that headroom.
"""

from configs.base import distill_config, structured_section

TARGETS = dict(embed_dim=3072, mlp_dim=9216)


def get_config(arg=None):
    c = distill_config()
    c.teacher.dtype = "bfloat16"
    c.teacher.preset = "llama3.1-8b"
    c.model.preset = "llama3.1-8b"
    # The pruned shape as preset overrides too, for ahead-of-time compilation.
    c.model.overrides = dict(TARGETS)
    c.model.remat_policy = "full"
    c.structured = structured_section(
        **TARGETS, calibration_batches=16, calibration_batch_size=64, calibration_seq_len=8192
    )
    c.mesh.fsdp = -1
    c.data.path = arg or ""
    c.data.format = "store"
    c.data.seq_len = 8192
    c.data.global_batch = 256
    c.train.grad_accum = 1
    c.train.steps = 20000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 40
    c.train.loss_chunk = 1024
    c.checkpoint.save_every = 500
    c.distill.kind = "forward_kl"
    c.distill.alpha = 1.0
    c.distill.temperature = 1.0
    return c
