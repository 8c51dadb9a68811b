"""LoRA: adapters on float and int8 bases, training only the adapters, checkpoints that
hold only them, merging, export of a LoRA run, and option errors."""

import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import lora_tiny
from llama_jax import nn, sharding
from llama_jax.compress import lora, quant
from llama_jax.config import get_preset
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats import ModelDir, dir_writer, model_dir, transforms
from llama_jax.nn.block import LORA_TARGETS
from llama_jax.nn.layers import LoraConfig
from llama_jax.nn.model import Llama
from llama_jax.train import loop as train
from llama_jax.train import optim
from llama_jax.train import step as train_step
from llama_jax.tree import flatten, nest

REPO = Path(__file__).parents[1]
CFG = get_preset("tiny")
TARGETS = ("layers.attn.q_proj", "layers.attn.o_proj", "layers.mlp.down_proj")


def _tokens(b=2, t=19, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, (b, t)))


@jax.jit(static_argnums=0)
def _logits(graphdef, params, tokens, keys=None):
    return nnx.merge(graphdef, params)(tokens, dropout_keys=keys)


def _split(params):
    """(base, adapters) of a LoRA model's parameter dict."""
    flat = flatten(params)
    adapters = {k: v for k, v in flat.items() if k.rsplit(".", 1)[1] in lora.ADAPTERS}
    base = {k: v for k, v in flat.items() if k not in adapters}
    return nest(base), nest(adapters)


def _with_random_b(adapters, scale=0.05):
    """Adapters whose B is nonzero (a fresh adapter's B is zero)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    out = []
    for i, (path, x) in enumerate(leaves):
        if "lora_b" in jax.tree_util.keystr(path):
            x = scale * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


ALL = LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=LORA_TARGETS)


@pytest.fixture(scope="module")
def models():
    """(graphdef, base params) of the plain tiny model, and (graphdef, adapters) of the
    same model with fresh adapters on every projection."""

    def make():
        return Llama(CFG, lora=ALL, rngs=nnx.Rngs(0))

    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())))()
    base, adapters = _split(params)
    plain = nnx.graphdef(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))
    return (plain, base), (nnx.graphdef(nnx.eval_shape(make)), adapters)


def test_targets_resolve_from_names_suffixes_regexes_and_all_linear():
    assert lora.resolve_targets(lora.DEFAULT_TARGETS) == (
        "layers.attn.q_proj",
        "layers.attn.v_proj",
    )
    assert lora.resolve_targets("all-linear") == LORA_TARGETS
    assert lora.resolve_targets("mlp.down_proj, layers.attn.o_proj.kernel") == (
        "layers.attn.o_proj",
        "layers.mlp.down_proj",
    )
    assert lora.resolve_targets(r"layers\.mlp\..*") == LORA_TARGETS[4:]
    assert lora.resolve_targets(r".*_proj\.kernel") == LORA_TARGETS
    with pytest.raises(ConfigError, match="'qproj' matches no block projection.*q_proj"):
        lora.resolve_targets("q_proj,qproj")


def test_fresh_adapters_leave_the_base_model_unchanged(models):
    (graphdef, base), (lora_graphdef, adapters) = models
    # The base parameters keep the plain model's paths; the adapters sit beside them.
    plain = nnx.state(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))
    assert flatten(base).keys() == flatten(nnx.to_pure_dict(plain)).keys()
    flat = flatten(adapters)
    assert set(flat) == {f"{t}.{n}" for t in LORA_TARGETS for n in lora.ADAPTERS}
    a, b = flat["layers.attn.o_proj.lora_a"], flat["layers.attn.o_proj.lora_b"]
    assert a.shape == (3, 6, 10, 4) and b.shape == (3, 4, 48)
    assert 0 < float(jnp.abs(a).max()) <= 1 / np.sqrt(6 * 10) and not bool(jnp.any(b))
    state = nnx.state(nnx.eval_shape(lambda: Llama(CFG, lora=ALL, rngs=nnx.Rngs(0))))
    names = state["layers"]["attn"]["o_proj"]["lora_a"].get_metadata()["out_sharding"]
    assert names == ("layers", "heads", "head_dim", None)
    names = state["layers"]["attn"]["q_proj"]["lora_b"].get_metadata()["out_sharding"]
    assert names == ("layers", None, "heads", "head_dim")
    tokens = _tokens()
    np.testing.assert_array_equal(
        np.asarray(_logits(lora_graphdef, lora.combine(base, adapters), tokens)),
        np.asarray(_logits(graphdef, base, tokens)),
    )


def test_merged_equals_unmerged_and_adapters_matter(models):
    (graphdef, base), (lora_graphdef, adapters) = models
    adapters = _with_random_b(adapters)
    tokens = _tokens()
    ref = _logits(lora_graphdef, lora.combine(base, adapters), tokens)
    got = _logits(graphdef, jax.jit(lora.merge, static_argnums=2)(base, adapters, ALL), tokens)
    assert float(jnp.abs(ref - _logits(graphdef, base, tokens)).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="targets"):
        lora.merge(base, adapters, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))


def test_adapters_on_an_int8_base(models):
    (graphdef, base), (_, fresh) = models
    q_base = jax.jit(quant.quantize_params)(base)
    q_graphdef = nnx.graphdef(
        nnx.eval_shape(
            lambda: Llama(
                CFG, lora=ALL, quantized=True, dot_general=quant.int8_dot_general, rngs=nnx.Rngs(0)
            )
        )
    )
    tokens = _tokens()

    @jax.jit
    def grads(adapters):
        def loss(adapters):
            logits = nnx.merge(q_graphdef, lora.combine(q_base, adapters))(tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.grad(loss)(adapters)

    # Gradients reach the adapters through the int8 path: B's first (A's gradient is
    # zero while B is), then both.
    for adapters, moving in ((fresh, ("lora_b",)), (_with_random_b(fresh), lora.ADAPTERS)):
        flat = flatten(grads(adapters))
        assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
        for name, g in flat.items():
            assert bool(jnp.any(g != 0)) == name.endswith(moving), name

    adapters = _with_random_b(fresh)
    unmerged = _logits(q_graphdef, lora.combine(q_base, adapters), tokens)
    merged_params = jax.jit(lora.merge, static_argnums=2)(q_base, adapters, ALL)
    flat = flatten(merged_params)
    assert flat.keys() == flatten(base).keys()
    assert flat["layers.attn.k_proj.kernel"].dtype == jnp.float32
    merged = _logits(graphdef, merged_params, tokens)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-4, rtol=1e-4)


def test_dropout_applies_only_with_keys_and_per_row(models):
    (_, base), (lora_graphdef, adapters) = models
    params = lora.combine(base, _with_random_b(adapters))
    tokens = jnp.tile(_tokens(b=1), (2, 1))
    plain = _logits(lora_graphdef, params, tokens)
    same = lora.dropout_keys(0, 1, jnp.asarray([5, 5]))
    other = lora.dropout_keys(0, 1, jnp.asarray([5, 6]))
    out_same = _logits(lora_graphdef, params, tokens, same)
    out_other = _logits(lora_graphdef, params, tokens, other)
    assert float(jnp.abs(out_same - plain).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(out_same[0]), np.asarray(out_same[1]))
    assert float(jnp.abs(out_other[0] - out_other[1]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(out_other[0]), np.asarray(out_same[0]))


def _batch(b=8, t=24):
    rs = np.random.RandomState(0)
    tokens = rs.randint(3, CFG.vocab_size, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, 15:] = 2
    mask = (np.roll(seg, -1, 1) == seg).astype(np.int32)
    mask[:, -1] = 0
    return dict(tokens=tokens, segment_ids=seg, targets=np.roll(tokens, -1, 1), loss_mask=mask)


def _shardings(abstract):
    return jax.tree.map(lambda x: x.sharding, abstract)


def test_training_moves_only_the_adapters(models):
    (_, base), (graphdef, adapters) = models
    mesh = sharding.create_mesh(data=2, fsdp=2, tensor=2)
    abstract = lora.abstract_model(lambda: Llama(CFG, lora=ALL, rngs=nnx.Rngs(0)), mesh)[1]
    base_sh = _shardings(nn.abstract_params(CFG, mesh)[1])
    base = jax.device_put(base, base_sh)
    before = jax.device_get(base)
    opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    tx = optim.make_optimizer(opt)
    state, shardings = train_step.init_state(
        jax.device_put(adapters, _shardings(abstract)), tx, mesh
    )
    batch_sh = train_step.batch_sharding(mesh, sharding.DEFAULT_RULES, (8, 24))
    batch = {k: jax.device_put(v, batch_sh) for k, v in _batch().items()}
    # With accumulation and dropout: each microbatch's rows carry their global index.
    lora_step = train_step.make_lora_train_step(
        graphdef, tx, optim.learning_rate_schedule(opt), grad_accum=2, dropout_seed=3
    )
    step_fn = train_step.jit_train_step(lora_step, shardings, batch_sh, base_sh)
    losses = []
    with sharding.activation_sharding(mesh):
        for _ in range(3):
            state, metrics = step_fn(state, batch, base)
            losses.append(float(metrics["loss"]))
    assert losses[2] < losses[0], losses

    flat = flatten(state.params)
    assert flat.keys() == flatten(adapters).keys()
    start = flatten(adapters)
    assert all(not np.array_equal(np.asarray(flat[k]), np.asarray(start[k])) for k in flat)
    layer = state.params["layers"]["attn"]
    assert tuple(layer["q_proj"]["lora_a"].sharding.spec) == (None, "fsdp", None)
    assert tuple(layer["q_proj"]["lora_b"].sharding.spec) == (None, None, "tensor", None)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


# --- LoRA runs: training, checkpoints, reading, export ---------------------------


def _write_base(out, params):
    dir_writer.write_model_dir(
        out,
        CFG,
        iter(flatten(params).items()),
        metadata={"source": {"kind": "random"}, "dtype": "float32"},
        files=model_dir.tokenizer_files(REPO / "configs" / "data"),
    )
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory, models):
    """A random base model directory, and one with other weights."""
    root = tmp_path_factory.mktemp("bases")
    params = jax.device_get(models[0][1])
    other = jax.tree.map(lambda x: jnp.asarray(x * np.float32(1.01)), params)
    return _write_base(root / "base", params), _write_base(root / "other", other)


def _cfg(base, **lora_overrides):
    c = lora_tiny.get_config(str(base))
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = 3
    c.train.warmup_steps = 0
    c.train.log_every = 3
    c.checkpoint.save_every = 3
    c.checkpoint.async_save = False
    c.lora.rank = 4
    c.lora.dropout = 0.1
    c.lora.targets = "q_proj,attn.o_proj,layers\\.mlp\\.down_proj"
    for k, v in lora_overrides.items():
        c.lora[k] = v
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, bases):
    work = tmp_path_factory.mktemp("lora") / "run"
    last = train.run(_cfg(bases[0]), str(work))
    assert np.isfinite(last["loss"])
    return work


def test_checkpoints_hold_only_the_adapters_and_name_their_base(run, bases):
    state_dir = run / "checkpoints" / "3" / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    arrays = [p for p in paths if "['params']" in p or "['mu']" in p or "['nu']" in p]
    assert arrays and all("lora_a" in p or "lora_b" in p for p in arrays), paths
    assert not any("kernel" in p or "embedding" in p or "scale" in p for p in paths)
    assert set(flatten(tree["params"])) == {f"{t}.{n}" for t in TARGETS for n in lora.ADAPTERS}
    nbytes = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(tree))
    base_bytes = json.loads((bases[0] / "metadata.json").read_text())["params_bytes"]
    assert nbytes < 0.25 * base_bytes, (nbytes, base_bytes)

    info = ModelDir.open(run).lora
    assert (info["rank"], info["alpha"], info["dropout"]) == (4, 16.0, 0.1)
    assert tuple(info["targets"]) == TARGETS
    assert info["base"]["path"] == str(bases[0].resolve())
    assert info["base"]["fingerprint"]["params"]


def test_a_lora_run_loads_exports_and_merges_onto_its_base(run, bases, tmp_path):
    state = ocp.StandardCheckpointer().restore(run / "checkpoints" / "3" / "state")
    adapters = jax.device_get(state["params"])
    one_device = sharding.create_mesh(devices=jax.devices()[:1])
    base = ModelDir.open(bases[0]).load_params(nn.abstract_params(CFG, one_device)[1])
    merge = jax.jit(lora.merge, static_argnums=2)
    want = flatten(merge(base, adapters, lora.from_meta(ModelDir.open(run).lora)))
    base_flat = flatten(base)

    # What launch.generate and evaluation do: load_model on the run directory.
    assert ModelDir.open(run).config == CFG and ModelDir.open(run).quantization is None
    model, _ = model_dir.load_model(run, mesh=sharding.create_mesh())
    got = flatten(nnx.to_pure_dict(nnx.state(model)))
    assert got.keys() == want.keys() == base_flat.keys()
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, err_msg=k)
        changed = not np.array_equal(np.asarray(got[k]), np.asarray(base_flat[k]))
        assert changed == (k.rsplit(".", 1)[0] in TARGETS and k.endswith(".kernel")), k
    assert model_dir.load_tokenizer(run).vocab_size <= CFG.vocab_size

    # convert.orbax_to_hf on the run directory streams the same merged weights.
    out = transforms.export_hf(run, tmp_path / "hf")
    exported = dict(ModelDir.open(out).iter_host_params())
    for k in want:
        np.testing.assert_allclose(exported[k], np.asarray(want[k]), rtol=1e-6, atol=1e-7)

    # launch.merge_lora, with the base moved since training (found by its fingerprint).
    moved = tmp_path / "moved"
    shutil.copytree(bases[0], moved)
    merged = transforms.merge_lora_dir(
        run, tmp_path / "merged", mesh=sharding.create_mesh(), base_dir=moved
    )
    meta = json.loads((merged / "metadata.json").read_text())
    assert meta["source"]["base"] == str(moved) and meta["lora"]["rank"] == 4
    assert meta["quantization"] is None
    written = dict(ModelDir.open(merged).iter_host_params())
    for k in want:
        np.testing.assert_allclose(written[k], np.asarray(want[k]), rtol=1e-6, atol=1e-7)


def test_another_base_is_refused_when_resuming_or_merging(run, bases, tmp_path):
    with pytest.raises(CheckpointError, match="other weights"):
        transforms.merge_lora_dir(
            run, tmp_path / "m", mesh=sharding.create_mesh(), base_dir=bases[1]
        )
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="other weights"):
        train.run(_cfg(bases[1]), str(run))
    with pytest.raises(ConfigError, match=r"lora\.rank: 4 -> 8"):
        train.run(_cfg(bases[0], rank=8), str(run))
    assert sorted(os.listdir(run / "checkpoints")) == ["3"]


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_a_stopped_lora_run_resumes_to_the_same_adapters(run, bases, tmp_path):
    """1 step, then a resume to 3, equals the 3 straight steps of `run` bit for bit
    (adapters, their moments and the dropout masks all depend on the step only)."""
    c = _cfg(bases[0])
    c.train.steps, c.checkpoint.save_every = 1, 1
    train.run(c, str(tmp_path / "r"))
    c.train.steps = 3
    train.run(c, str(tmp_path / "r"))
    handler = ocp.PyTreeCheckpointHandler()
    straight = handler.restore(run / "checkpoints" / "3" / "state")
    resumed = handler.restore(tmp_path / "r" / "checkpoints" / "3" / "state")
    a = jax.tree_util.tree_flatten_with_path(straight)[0]
    b = jax.tree_util.tree_flatten_with_path(resumed)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize(
    "section, changes, match",
    [
        ("lora", dict(rank=-1), r"lora\.rank=-1"),
        ("lora", dict(alpha=0.0), "alpha=0.0"),
        ("lora", dict(dropout=1.0), r"dropout=1\.0"),
        ("lora", dict(targets="q_proj,gate"), r"'gate' matches no block projection.*mlp\.up_proj"),
        ("model", dict(model_dir=""), "needs model.model_dir"),
        ("prune", dict(sparsity=0.5), "prune and lora"),
    ],
)
def test_bad_options_fail_before_compiling(tmp_path, bases, section, changes, match):
    c = _cfg(bases[0])
    for k, v in changes.items():
        c[section][k] = v
    start = time.time()
    with pytest.raises(ValueError, match=match):
        train.run(c, str(tmp_path))
    assert time.time() - start < 10
    assert not (tmp_path / "checkpoints").exists()
