"""Bad model directories fail with errors that name the file, tensor and expectation."""

import json
import os

import numpy as np
import pytest
import torch
from hf_models import make_hf_model, rewrite_config
from safetensors.numpy import load_file, save_file

from llama_jax.errors import CheckpointError
from llama_jax.formats.model_dir import load_hf


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model(tmp_path, num_key_value_heads=1)
    return tmp_path


def _edit_tensors(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_type(hf_dir, rope_type):
    rewrite_config(
        hf_dir,
        lambda d: (
            d | {"rope_parameters": {"rope_type": rope_type, "factor": 2.0, "rope_theta": 1e4}}
        ),
    )
    with pytest.raises(CheckpointError, match=rf"config\.json.*{rope_type}"):
        load_hf(hf_dir)


def test_unsupported_architecture(hf_dir):
    rewrite_config(
        hf_dir, lambda d: d | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    )
    with pytest.raises(CheckpointError, match="qwen2"):
        load_hf(hf_dir)


def test_missing_tensor(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing.*\[74, 40\]"
    ):
        load_hf(hf_dir)


def test_wrong_shape(hf_dir):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][
            :4
        ]

    _edit_tensors(hf_dir, shrink)
    with pytest.raises(
        CheckpointError, match=r"k_proj\.weight.*shape \[4, 40\]; expected \[8, 40\]"
    ):
        load_hf(hf_dir)


def test_extra_tensor(hf_dir):
    _edit_tensors(
        hf_dir, lambda t: t.update({"model.layers.0.mystery.weight": np.ones(3, np.float32)})
    )
    with pytest.raises(CheckpointError, match="mystery"):
        load_hf(hf_dir)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(hf_dir, keep):
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_hf(hf_dir)


def test_corrupt_header(hf_dir):
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf(hf_dir)


def test_pickle_checkpoint_is_refused(tmp_path):
    make_hf_model(tmp_path, num_key_value_heads=1)
    os.remove(tmp_path / "model.safetensors")
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*(?s:.*)arbitrary code"):
        load_hf(tmp_path)


def test_missing_shard_listed_in_index(tmp_path):
    make_hf_model(tmp_path, num_key_value_heads=1, max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_hf(tmp_path)


def test_missing_config(hf_dir):
    os.remove(hf_dir / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(hf_dir)


def test_integer_weights_are_refused(hf_dir):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int8)

    _edit_tensors(hf_dir, to_int)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*int8.*floating"):
        load_hf(hf_dir)


def _rewrite_header(path, fn):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = fn(json.loads(data[8 : 8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e | {"shape": [-4, -10]}, "malformed header entry"),
        (lambda e: e | {"data_offsets": [0.5, 3]}, "malformed header entry"),
        (
            lambda e: e | {"data_offsets": [0, e["data_offsets"][1] - e["data_offsets"][0]]},
            "overlap",
        ),
    ],
)
def test_malformed_header_entries(hf_dir, change, match):
    name = "model.layers.1.input_layernorm.weight"

    def edit(header):
        header[name] = change(header[name])
        return header

    _rewrite_header(hf_dir / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        load_hf(hf_dir)


def test_index_and_shards_disagree(tmp_path):
    make_hf_model(tmp_path, num_key_value_heads=1, max_shard_size="20KB")
    path = tmp_path / "model.safetensors.index.json"
    with open(path) as f:
        index = json.load(f)
    index["weight_map"].pop("model.norm.weight")
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*disagree"):
        load_hf(tmp_path)
