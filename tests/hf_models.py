"""Tiny random `LlamaForCausalLM` checkpoints written locally with transformers."""

import copy
import json
import os

import torch
import transformers


def hf_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(
        vocab_size=131,
        hidden_size=40,
        intermediate_size=74,
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=5,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than transformers' 0.02 so logits are O(1) and mistakes show.
        initializer_range=0.1,
    )
    # A copy: transformers writes into the rope dict it is given (adding rope_theta),
    # which would leak one test's theta into the next test that reuses the dict.
    kwargs.update(copy.deepcopy(overrides))
    return transformers.LlamaConfig(**kwargs)


def make_hf_model(directory, seed=0, max_shard_size=None, dtype=None, **overrides):
    """Writes a random model with save_pretrained (in `dtype`, a torch dtype, default
    float32); returns the torch model."""
    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random norms and biases too, so a mapping mistake cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return model


def rewrite_config(directory, fn):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    d = fn(d)
    with open(path, "w") as f:
        json.dump(d, f)
