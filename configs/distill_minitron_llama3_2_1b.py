"""LLaMA 3.2 1B -> ~600M on one GPU: prune the teacher's width by its activations, then
distil from the unpruned teacher (the Minitron recipe).

  python -m convert.hf_to_orbax --hf_dir=/models/Llama-3.2-1B --out_dir=/ckpt/llama3.2-1b
  python -m launch.distill --config=configs/distill_minitron_llama3_2_1b.py:/data/train.jsonl \
      --workdir=/ckpt/minitron-600m --config.teacher.model_dir=/ckpt/llama3.2-1b \
      --config.data.tokenizer=/ckpt/llama3.2-1b

The argument after ':' is the JSONL training file (field "text"), which also serves as
calibration data (256 rows of 2048 tokens). The student is the teacher sliced to
width 1536 (D), 24 query heads (3 per kv head, all 8 kv heads kept), MLP 4096, all 16
layers: 600M parameters, 49% of the teacher's 1.24B, with the teacher's vocabulary and
tied embeddings. It is pruned once at start-up and saved in <workdir>/pruned_student.
Learning rate and loss follow Minitron: logit KD only (alpha 1), peak 1e-4, cosine.
"""

from configs.base import distill_config, structured_section

TARGETS = dict(embed_dim=1536, num_heads=24, mlp_dim=4096)


def get_config(arg=None):
    c = distill_config()
    c.teacher.dtype = "bfloat16"
    c.model.preset = "llama3.2-1b"
    # The pruned shape as preset overrides too, for ahead-of-time compilation.
    c.model.overrides = dict(TARGETS)
    c.model.remat_policy = "dots_no_batch"
    c.structured = structured_section(
        **TARGETS, calibration_batches=32, calibration_batch_size=8, calibration_seq_len=2048
    )
    c.data.path = arg or ""
    c.data.format = "jsonl"
    c.data.seq_len = 2048
    c.data.global_batch = 8
    c.train.steps = 20000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 100
    c.checkpoint.save_every = 1000
    c.distill.kind = "forward_kl"
    c.distill.alpha = 1.0
    c.distill.temperature = 1.0
    return c
