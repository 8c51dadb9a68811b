"""Hugging Face `LlamaForCausalLM` tensor names and layouts, as data.

Each project parameter path maps to (HF tensor name, HF layout, project layout).
Layouts use the dimension alphabet of WORKSPACE.md; "(N H)" is one HF axis that
holds N * H values, N major. "{i}" is the layer index: the project stacks the
per-layer tensors along a leading L axis. HF `nn.Linear` weights are [out, in];
project kernels are [in..., out...].
"""

LAYER_PREFIX = "model.layers.{i}."

PARAMS: dict[str, tuple[str, str, str]] = {
    "embed.embedding": ("model.embed_tokens.weight", "V D", "V D"),
    "final_norm.scale": ("model.norm.weight", "D", "D"),
    "lm_head.kernel": ("lm_head.weight", "V D", "D V"),
    "layers.attn_norm.scale": (LAYER_PREFIX + "input_layernorm.weight", "D", "D"),
    "layers.attn.q_proj.kernel": (LAYER_PREFIX + "self_attn.q_proj.weight", "(N H) D", "D N H"),
    "layers.attn.q_proj.bias": (LAYER_PREFIX + "self_attn.q_proj.bias", "(N H)", "N H"),
    "layers.attn.k_proj.kernel": (LAYER_PREFIX + "self_attn.k_proj.weight", "(K H) D", "D K H"),
    "layers.attn.k_proj.bias": (LAYER_PREFIX + "self_attn.k_proj.bias", "(K H)", "K H"),
    "layers.attn.v_proj.kernel": (LAYER_PREFIX + "self_attn.v_proj.weight", "(K H) D", "D K H"),
    "layers.attn.v_proj.bias": (LAYER_PREFIX + "self_attn.v_proj.bias", "(K H)", "K H"),
    "layers.attn.o_proj.kernel": (LAYER_PREFIX + "self_attn.o_proj.weight", "D (N H)", "N H D"),
    "layers.attn.o_proj.bias": (LAYER_PREFIX + "self_attn.o_proj.bias", "D", "D"),
    "layers.mlp_norm.scale": (LAYER_PREFIX + "post_attention_layernorm.weight", "D", "D"),
    "layers.mlp.gate_proj.kernel": (LAYER_PREFIX + "mlp.gate_proj.weight", "F D", "D F"),
    "layers.mlp.gate_proj.bias": (LAYER_PREFIX + "mlp.gate_proj.bias", "F", "F"),
    "layers.mlp.up_proj.kernel": (LAYER_PREFIX + "mlp.up_proj.weight", "F D", "D F"),
    "layers.mlp.up_proj.bias": (LAYER_PREFIX + "mlp.up_proj.bias", "F", "F"),
    "layers.mlp.down_proj.kernel": (LAYER_PREFIX + "mlp.down_proj.weight", "D F", "F D"),
    "layers.mlp.down_proj.bias": (LAYER_PREFIX + "mlp.down_proj.bias", "D", "D"),
}

# Tensors some checkpoints carry that the model derives instead; skipped on load.
IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)

# When embeddings are tied, a saved LM head duplicates the embedding; skipped on load.
TIED_DUPLICATE = "lm_head.weight"
