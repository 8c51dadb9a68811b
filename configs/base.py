"""Defaults shared by every training config; each config edits a copy."""

import ml_collections
from ml_collections import config_dict

from llama_jax.compress import DEFAULT_INCLUDE, DEFAULT_TARGETS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",  # a llama_jax.config preset name, used when model_dir is empty
            # A model directory to start from instead of random weights: Hugging Face,
            # converted (convert.hf_to_orbax) or another run's workdir.
            model_dir="",
            # LlamaConfig fields replacing the preset's: nested in a config file
            # ({"num_layers": 4, "embed_dim": 256}) or "num_layers=4,embed_dim=256".
            overrides=config_dict.FieldReference("", field_type=object),
            dtype="bfloat16",  # compute dtype
            param_dtype="float32",  # master weights
            scan_layers=True,
            remat_policy="none",
            attention_impl="auto",
        )
    )
    c.mesh = ml_collections.ConfigDict(
        dict(
            dcn=1,
            data=1,
            fsdp=-1,
            tensor=1,
            # Logical-axis overrides: nested ({"vocab": "fsdp", "mlp": "tensor+fsdp",
            # "embed": ""}) or "vocab=fsdp,mlp=tensor+fsdp,embed=" ("" replicates).
            rules=config_dict.FieldReference("", field_type=object),
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            # A file, or a token store directory (launch.prepare_data), local or gs://.
            path="",
            format="text",  # text | jsonl | tokens | store (a store is also detected)
            field="text",
            tokenizer="",  # a tokenizer file or a model directory holding one
            seq_len=2048,
            global_batch=8,
            seed=0,
            add_bos=True,
            add_eos=True,
            # Batches of a store read ahead in the background (0: when asked for).
            prefetch=2,
            # Stores mixed by weight instead of `path`: "STORE_A:0.7,STORE_B:0.3", or a
            # list of such items or of {"path": ..., "weight": ...}.
            sources=config_dict.FieldReference("", field_type=object),
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            learning_rate=3e-4,
            warmup_steps=100,
            decay="cosine",
            end_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            grad_accum=1,
            loss_chunk=1024,
            log_every=10,
            seed=0,
            # "A:B" traces steps A to B with jax.profiler into <workdir>/profile
            # (TensorBoard's profile plugin or XProf reads it).
            profile_steps="",
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(save_every=500, keep=3, async_save=True))
    # Magnitude pruning while training (llama_jax.prune): off while sparsity is 0 and
    # the pattern unstructured. With an N:M pattern (e.g. "2:4") sparsity is (M - N) / M.
    c.prune = ml_collections.ConfigDict(
        dict(
            sparsity=0.0,
            pattern="unstructured",
            schedule="one_shot",  # or "gradual" (cubic ramp from start_step to end_step)
            scope="global",  # or "per_layer"
            start_step=0,
            end_step=0,
            update_every=100,  # gradual: steps between mask updates
            include=DEFAULT_INCLUDE,  # regex over kernel paths: every block projection
        )
    )
    # LoRA fine-tuning (llama_jax.lora): off while rank is 0. With a rank, the base in
    # model.model_dir is frozen and only the adapters train and are checkpointed.
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=0,
            alpha=16.0,  # the adapters' output is scaled by alpha / rank
            dropout=0.0,  # on the adapters' input, while training
            # Comma-separated projection names ("q_proj"), dotted paths or regexes over
            # "layers.attn.q_proj"-style paths; "all-linear": every block projection.
            targets=DEFAULT_TARGETS,
        )
    )
    return c


def distill_config() -> ml_collections.ConfigDict:
    """A training config plus the teacher and the distillation loss. `model` is the
    student: random from `preset`, from `model_dir`, or from `teacher_layers`."""
    return with_distillation(base_config())


def with_distillation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the teacher and distillation sections (defaults) to a training config."""
    # Teacher layers that initialise the student ('0,2,4', 'every_other', 'first:N'):
    # the student then has the teacher's shape with those layers.
    c.model.teacher_layers = ""
    c.teacher = ml_collections.ConfigDict(
        dict(
            model_dir="",  # any model directory: Hugging Face, converted, or a run
            # A llama_jax.config preset giving the teacher's shapes where model_dir
            # cannot be read (launch.compile, ahead of time); runs need model_dir.
            preset="",
            dtype="bfloat16",  # the teacher's compute and stored dtype
            scan_layers=True,
            attention_impl="auto",
            # Its cached top-k distributions (python -m launch.teacher_logits): the step
            # then reads them instead of running the teacher (model_dir gives its shape).
            logits_dir="",
        )
    )
    c.distill = ml_collections.ConfigDict(
        dict(
            kind="forward_kl",  # forward_kl | reverse_kl | jsd
            temperature=1.0,
            alpha=0.5,  # weight of the KD term; 1 - alpha weights the data cross-entropy
            beta=0.5,  # jsd mixing weight
            top_k=0,  # 0: the teacher's full distribution
            alpha_end=-1.0,  # >= 0: alpha moves linearly to this by the last step
            temperature_end=-1.0,  # > 0: the temperature moves linearly to this
            eval_path="",  # held-out data (same format and tokenizer as data.path)
            eval_every=0,  # evaluate every N steps (and at the end); 0: at the end only
            eval_batches=4,
            # Hidden-state distillation: "student_layer:teacher_layer,..." (e.g.
            # "3:7,7:15"), matched by MSE and/or cosine distance with these weights,
            # through a learned projection when the widths differ ("auto"), always, or
            # never (then the widths must match). The projection is not exported.
            features="",
            feature_mse=1.0,
            feature_cosine=0.0,
            feature_projection="auto",
            # On-policy distillation (GKD), on when max_new_tokens > 0: on a fraction
            # lmbda of the steps the student continues prompts with its own samples and
            # the teacher scores them; the divergence is the generalized JSD of beta
            # (0 forward KL, 1 reverse KL), so alpha must be 1. Prompts are cut from the
            # training rows (keeping >= min_prompt tokens) or read from a JSONL file.
            on_policy=ml_collections.ConfigDict(
                dict(
                    lmbda=0.5,
                    beta=0.5,
                    temperature=1.0,
                    max_new_tokens=0,
                    prompts="",
                    prompt_field="prompt",
                    min_prompt=8,
                )
            ),
        )
    )
    # Structured pruning at start-up (the Minitron recipe), on when a target is set: the
    # student starts as the teacher sliced to these sizes by activation importance.
    c.structured = structured_section()
    return c


def structured_section(**overrides) -> ml_collections.ConfigDict:
    """Structured-pruning settings (llama_jax.structured.StructuredConfig): target
    sizes (0 keeps the teacher's), calibration data and how activations are scored."""
    s = dict(
        num_layers=0,
        num_heads=0,
        num_kv_heads=0,
        mlp_dim=0,
        embed_dim=0,
        calibration_data="",  # a text/JSONL/.npy file; "": the run's data.path
        calibration_format="",  # "": from the suffix (.jsonl, .npy, else text)
        calibration_field="text",
        calibration_batches=16,
        calibration_batch_size=8,
        calibration_seq_len=1024,
        seq_aggregation="mean",  # over a row's tokens; then over rows:
        batch_aggregation="l2",
        layer_metric="ppl",  # or "block_influence"
    )
    s.update(overrides)
    return ml_collections.ConfigDict(s)
