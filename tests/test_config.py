import pytest

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, get_preset
from llama_jax.errors import ConfigError

HF_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


def test_both_rope_layouts_read_the_same():
    v4 = HF_BASE | {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    v5 = HF_BASE | {"rope_parameters": dict(v4["rope_scaling"], rope_theta=500000.0)}
    a, b = LlamaConfig.from_hf(v4), LlamaConfig.from_hf(v5)
    assert a == b
    assert a.rope_theta == 500000.0
    assert a.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert a.head_dim == 16


def test_defaults_and_fields():
    c = LlamaConfig.from_hf(
        HF_BASE | {"head_dim": 24, "tie_word_embeddings": True, "eos_token_id": [5, 6]}
    )
    assert c.head_dim == 24 and c.tie_word_embeddings and c.eos_token_ids == (5, 6)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    d = LlamaConfig.from_hf(
        HF_BASE | {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    )
    assert d.rope_theta == 7.0 and d.rope_scaling is None


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope", "mystery"])
def test_unsupported_rope_type_is_an_error(rope_type):
    cfg = HF_BASE | {"rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
    with pytest.raises(ConfigError, match=rope_type):
        LlamaConfig.from_hf(cfg)
    cfg5 = HF_BASE | {"rope_parameters": {"rope_type": rope_type, "factor": 2.0, "rope_theta": 1.0}}
    with pytest.raises(ConfigError, match=rope_type):
        LlamaConfig.from_hf(cfg5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        ({"model_type": "gemma"}, "gemma"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"num_key_value_heads": 3}, "num_kv_heads=3"),
    ],
)
def test_unsupported_architecture_is_an_error(change, match):
    with pytest.raises(ConfigError, match=match):
        LlamaConfig.from_hf(HF_BASE | change)


def test_hf_round_trip_for_every_preset():
    for name, preset in PRESETS.items():
        assert LlamaConfig.from_hf(preset.to_hf()) == preset, name
        assert LlamaConfig.from_dict(preset.to_dict()) == preset, name


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama2-7b", 6.74),
        ("llama2-13b", 13.02),
        ("llama2-70b", 68.98),
        ("llama3-8b", 8.03),
        ("llama3.1-70b", 70.55),
        ("llama3.1-405b", 405.85),
        ("llama3.2-1b", 1.24),
        ("llama3.2-3b", 3.21),
    ],
)
def test_preset_sizes_match_published_counts(name, billions):
    assert get_preset(name).num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="llama9"):
        get_preset("llama9")
