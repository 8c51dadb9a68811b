"""Logit parity in float32 with transformers' LlamaForCausalLM across architectures."""

import json
import os

import numpy as np
import pytest
import torch
from hf_models import make_hf_model, rewrite_config

from llama_jax.formats.model_dir import load_hf

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "mha": dict(num_attention_heads=5, num_key_value_heads=5),
    "gqa_g2": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),
    "gqa_g3": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2),
    "heads_not_pow2": dict(hidden_size=42, num_attention_heads=7, num_key_value_heads=7),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim_not_d_over_n": dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=10
    ),
    "llama3_rope": dict(num_attention_heads=5, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 3.0}),
    "biases": dict(attention_bias=True, mlp_bias=True, rope_theta=500000.0),
}


def _compare(hf_model, hf_dir, seq=37, **load_kwargs):
    tokens = np.random.RandomState(0).randint(0, hf_model.config.vocab_size, (2, seq))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.float().numpy()
    model, _ = load_hf(hf_dir, **load_kwargs)
    out = np.asarray(model(tokens))
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.5, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity(case, tmp_path):
    hf_model = make_hf_model(tmp_path, **CASES[case])
    _compare(hf_model, tmp_path)


def test_parity_with_transformers_4x_config_layout(tmp_path):
    hf_model = make_hf_model(
        tmp_path, num_key_value_heads=1, rope_theta=20000.0, rope_scaling=LLAMA3_ROPE
    )

    def to_4x(d):
        params = d.pop("rope_parameters")
        assert params["rope_type"] == "llama3"
        d["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")  # the oldest spelling of the key
        d["rope_scaling"] = params
        return d

    rewrite_config(tmp_path, to_4x)
    _compare(hf_model, tmp_path)


def test_parity_with_sharded_safetensors(tmp_path):
    hf_model = make_hf_model(tmp_path, num_key_value_heads=1, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    _compare(hf_model, tmp_path)


def test_parity_unrolled_and_remat(tmp_path):
    hf_model = make_hf_model(tmp_path, num_key_value_heads=1)
    _compare(hf_model, tmp_path, scan_layers=False, remat_policy="full")


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "linear", "factor": 3.0}, LLAMA3_ROPE | {"factor": 32.0}],
)
def test_rope_inverse_frequencies_are_bit_identical(rope, tmp_path):
    from llama_jax.config import LlamaConfig
    from llama_jax.nn.layers import rope_inv_freq

    hf_model = make_hf_model(
        tmp_path,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rope_scaling=rope,
        num_hidden_layers=1,
    )
    ours = rope_inv_freq(LlamaConfig.from_hf(hf_model.config.to_dict()))
    np.testing.assert_array_equal(ours, hf_model.model.rotary_emb.inv_freq.numpy())


def test_parity_at_long_positions(tmp_path):
    import jax.numpy as jnp

    hf_model = make_hf_model(
        tmp_path,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE | {"original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
    )
    tokens = np.random.RandomState(0).randint(0, 131, (1, 16))
    positions = np.arange(100_000, 100_016)[None]
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens), position_ids=torch.tensor(positions)).logits.numpy()
    model, _ = load_hf(tmp_path)
    out = np.asarray(model(jnp.asarray(tokens), positions_BT=jnp.asarray(positions)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_layer_states_are_transformers_hidden_states(tmp_path, scan_layers):
    hf_model = make_hf_model(tmp_path, num_hidden_layers=4, num_key_value_heads=1)
    tokens = np.random.RandomState(1).randint(0, hf_model.config.vocab_size, (2, 19))
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens), output_hidden_states=True)
    # transformers' hidden_states[i + 1] is the output of layer i (the last one normed).
    ref = [h.float().numpy() for h in out.hidden_states]
    model, _ = load_hf(tmp_path, scan_layers=scan_layers)
    h, layers = model.layer_states(tokens, (2, 0, 1))
    assert layers.shape == (3, 2, 19, hf_model.config.hidden_size)
    for got, i in zip(layers, (2, 0, 1), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref[i + 1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(h), ref[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(model.unembed(h)), out.logits.float().numpy(), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        model.layer_states(tokens, (4,))
