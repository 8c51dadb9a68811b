"""Meshes, logical-axis rules, and models created directly in their shards."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import sharding
from llama_jax.config import get_preset
from llama_jax.errors import ConfigError
from llama_jax.nn.model import Llama

CFG = get_preset("tiny")


def _make():
    return Llama(CFG, rngs=nnx.Rngs(0))


@functools.cache
def _reference():
    """The unsharded parameters, created under jit as the sharded ones are."""
    return dict(nnx.to_flat_state(jax.jit(lambda: nnx.split(_make())[1])()))


def test_mesh_shape_resolves_minus_one_and_checks_the_product():
    assert sharding.mesh_shape(8, data=2, fsdp=-1, tensor=2) == dict(
        dcn=1, data=2, fsdp=2, tensor=2
    )
    assert sharding.mesh_shape(8, data=-1, fsdp=1, dcn=2) == dict(dcn=2, data=4, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match="expected the 8 available"):
        sharding.mesh_shape(8, data=2, fsdp=2, tensor=1)
    with pytest.raises(ConfigError, match="do not divide"):
        sharding.mesh_shape(8, data=3, fsdp=-1)
    with pytest.raises(ConfigError, match="only one"):
        sharding.mesh_shape(8, data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="tensor=0"):
        sharding.mesh_shape(8, tensor=0)


def test_spec_replicates_dimensions_the_mesh_does_not_divide():
    mesh = sharding.create_mesh(data=1, fsdp=2, tensor=4)
    # 6 heads over tensor=4 do not divide: replicated; 48 over fsdp=2 does.
    spec = sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (3, 48, 6, 10), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    spec = sharding.logical_to_spec(("embed", "mlp"), (48, 96), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # A mesh axis is used once per array: the second 'embed' stays whole.
    spec = sharding.logical_to_spec(("embed", "embed"), (48, 48), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp", None)


def test_unknown_logical_name_or_mesh_axis_is_an_error():
    mesh = sharding.create_mesh(fsdp=-1)
    with pytest.raises(ConfigError, match="'experts'"):
        sharding.logical_to_spec(("experts",), (8,), mesh)
    with pytest.raises(ConfigError, match="model"):
        sharding.rules_from_config({"mlp": "model"})
    with pytest.raises(ConfigError, match="'expert'"):
        sharding.rules_from_config({"expert": "tensor"})


@pytest.mark.parametrize(
    "axes",
    [
        dict(fsdp=1, devices=1),
        dict(data=8, fsdp=1),
        dict(fsdp=8),
        dict(data=2, fsdp=1, tensor=4),
        dict(data=2, fsdp=2, tensor=2),
    ],
)
def test_sharded_creation_has_the_shards_the_rules_imply(axes):
    devices = jax.devices()[: axes.pop("devices", 8)]
    mesh = sharding.create_mesh(devices=devices, **axes)
    model = sharding.create_sharded(_make, mesh)
    ref_flat = _reference()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        array = var.get_value()
        names = var.get_metadata()["out_sharding"]
        spec = sharding.logical_to_spec(names, array.shape, mesh)
        assert array.sharding.spec == spec, path
        expected = list(array.shape)
        for i, axes in enumerate(spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                expected[i] //= mesh.shape[axis]
        assert all(list(s.data.shape) == expected for s in array.addressable_shards), path
        np.testing.assert_array_equal(array, ref_flat[path].get_value())


def test_rule_override_changes_placement():
    mesh = sharding.create_mesh(data=1, fsdp=2, tensor=4)
    rules = sharding.rules_from_config({"vocab": "fsdp", "embed": None})
    spec = sharding.logical_to_spec(("vocab", "embed"), (263 * 2, 48), mesh, rules)
    assert spec == jax.sharding.PartitionSpec("fsdp", None)


def test_load_hf_straight_into_shards(tmp_path):
    from hf_models import make_hf_model

    from llama_jax.formats.model_dir import load_hf

    make_hf_model(tmp_path, hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    mesh = sharding.create_mesh(data=1, fsdp=2, tensor=4)
    sharded, _ = load_hf(tmp_path, mesh=mesh)
    plain, _ = load_hf(tmp_path)
    plain_flat = dict(nnx.to_flat_state(nnx.state(plain)))
    for path, var in nnx.to_flat_state(nnx.state(sharded)):
        array = var.get_value()
        names = var.get_metadata()["out_sharding"]
        assert array.sharding.spec == sharding.logical_to_spec(names, array.shape, mesh), path
        np.testing.assert_array_equal(array, plain_flat[path].get_value())
