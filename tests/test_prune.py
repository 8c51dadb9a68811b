"""Magnitude pruning: exact sparsity on schedule, N:M along the input axis, zeros and
moments that stay zero, masks through checkpoints, sharding, the one-shot CLI, and
bad options."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from configs import tiny
from llama_jax import sharding
from llama_jax.compress import prune
from llama_jax.config import get_preset
from llama_jax.errors import ConfigError
from llama_jax.formats import ModelDir, model_dir, transforms
from llama_jax.nn.model import Llama
from llama_jax.train import checkpointer as checkpoint
from llama_jax.train import loop as train
from llama_jax.train import optim
from llama_jax.train import step as train_step
from llama_jax.train.run_config import RunConfig
from tests.hf_models import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "configs", "data", "tokenizer.json")
CFG = get_preset("tiny")
KERNELS = ("layers.attn.q_proj.kernel", "layers.attn.o_proj.kernel", "layers.mlp.up_proj.kernel")


def _params(seed=0, ties=False):
    """Three stacked kernels (o_proj contracts two axes) and a norm that is never pruned.
    ties=True rounds the weights to one decimal, so many magnitudes are equal."""
    rng = np.random.default_rng(seed)
    shapes = {KERNELS[0]: (3, 16, 2, 8), KERNELS[1]: (3, 2, 8, 16), KERNELS[2]: (3, 16, 24)}
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    if ties:
        flat = {k: np.round(v, 1) for k, v in flat.items()}
    flat["layers.mlp_norm.scale"] = np.ones((3, 16), np.float32)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep=".")


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


def _expected(s, n):
    return math.floor(s * n + 0.5)


def _run_schedule(cfg, params, steps, seed=0):
    """AdamW (with weight decay) wrapped in pruning for `steps` steps on random
    gradients; yields (count, params, state) after every step."""
    opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=steps)
    tx = prune.masked(optim.make_optimizer(opt), cfg, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        keys = jax.random.split(key, len(jax.tree.leaves(params)))
        leaves = [
            jax.random.normal(k, x.shape)
            for k, x in zip(keys, jax.tree.leaves(params), strict=True)
        ]
        grads = jax.tree.unflatten(jax.tree.structure(params), leaves)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    key = jax.random.PRNGKey(seed)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state = step(params, state, sub)
        yield int(state.count), params, state


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_exact_sparsity_at_every_schedule_point(scope, ties=True):
    cfg = prune.PruneConfig(
        sparsity=0.7, schedule="gradual", scope=scope, start_step=1, end_step=9, update_every=3
    )
    assert cfg.points() == [1, 4, 7, 9]
    start = _params(ties=ties)
    applied = {}  # count after the update that applied a point -> its sparsity
    for p in cfg.points():
        progress = (p - 1) / 8
        applied[p + 1] = 0.7 * (1 - (1 - progress) ** 3)
    last = 0.0
    for count, params, state in _run_schedule(cfg, start, 12):
        last = applied.get(count, last)
        masks = _flat(state.masks)
        weights = _flat(params)
        assert sorted(masks) == sorted(KERNELS)  # the norm is not pruned
        for k in KERNELS:
            # Masks and exact zeros agree (no surviving weight is exactly 0 here).
            np.testing.assert_array_equal(weights[k] == 0, ~masks[k])
        if scope == "global":
            n = sum(m.size for m in masks.values())
            assert sum((~m).sum() for m in masks.values()) == _expected(last, n), count
        else:
            for k, m in masks.items():
                per = (~m).reshape(m.shape[0], -1).sum(axis=1)
                assert list(per) == [_expected(last, m[0].size)] * m.shape[0], (k, count)
    assert last == pytest.approx(0.7)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruned_magnitudes_never_exceed_kept_ones(scope):
    params = _params(seed=3, ties=True)
    cfg = prune.PruneConfig(sparsity=0.45, scope=scope)
    masks = _flat(prune.compute_masks(cfg, params, prune.pruned_paths(cfg, params), 0))
    weights = _flat(params)
    if scope == "global":
        pruned = np.concatenate([np.abs(weights[k])[~masks[k]] for k in KERNELS])
        kept = np.concatenate([np.abs(weights[k])[masks[k]] for k in KERNELS])
        assert pruned.max() <= kept.min()
        assert pruned.max() == kept.min()  # ties at the threshold, split exactly
    else:
        for k in KERNELS:
            for layer in range(3):
                w, m = np.abs(weights[k][layer]), masks[k][layer]
                assert w[~m].max() <= w[m].min(), (k, layer)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_n_m_groups_run_along_the_contracting_axis(pattern):
    n, m = prune.parse_pattern(pattern)
    params = _params(seed=1)
    cfg = prune.PruneConfig(sparsity=0.0, pattern=pattern)
    masks = _flat(prune.compute_masks(cfg, params, prune.pruned_paths(cfg, params), 0))
    weights = _flat(params)
    # The input (contracting) axis: D for q/up ([L, D, ...]); H, the last of o's two
    # input axes ([L, N, H, D]).
    for k, axis in ((KERNELS[0], 1), (KERNELS[1], 2), (KERNELS[2], 1)):
        mask = np.moveaxis(masks[k], axis, -1)
        w = np.abs(np.moveaxis(weights[k], axis, -1))
        groups = mask.reshape(*mask.shape[:-1], -1, m)
        assert (groups.sum(-1) == n).all(), k
        wg = w.reshape(*w.shape[:-1], -1, m)
        kept_min = np.where(groups, wg, np.inf).min(-1)
        pruned_max = np.where(groups, -np.inf, wg).max(-1)
        assert (pruned_max <= kept_min).all(), k
        # Along the output axis the groups are not N:M (the pattern is not transposed).
        out = np.moveaxis(masks[k], -1, -1 if axis != mask.ndim - 1 else 1)
        if out.shape[-1] % m == 0:
            assert not (out.reshape(*out.shape[:-1], -1, m).sum(-1) == n).all(), k


def test_zeros_and_adam_moments_stay_zero_through_many_steps():
    cfg = prune.PruneConfig(sparsity=0.6, scope="per_layer")
    start = _flat(_params())
    for count, params, state in _run_schedule(cfg, _params(), 20):
        masks, weights = _flat(state.masks), _flat(params)
        adam = state.inner[1][0]
        assert isinstance(adam, optax.ScaleByAdamState)
        mu, nu = _flat(adam.mu), _flat(adam.nu)
        for k in KERNELS:
            assert (weights[k][~masks[k]] == 0).all(), (k, count)
            assert (mu[k][~masks[k]] == 0).all() and (nu[k][~masks[k]] == 0).all(), (k, count)
            # Kept weights still train.
            assert (weights[k][masks[k]] != start[k][masks[k]]).mean() > 0.99
    # The masks never changed after the one-shot point, and the norm trained untouched.
    assert not np.array_equal(weights["layers.mlp_norm.scale"], start["layers.mlp_norm.scale"])


def test_sharded_masks_equal_unsharded_ones():
    config = CFG
    model = Llama(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    mesh = sharding.create_mesh(fsdp=4, tensor=2)
    sharded = sharding.create_sharded(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh)
    sharded = nnx.to_pure_dict(nnx.split(sharded)[1])
    spec = sharded["layers"]["attn"]["q_proj"]["kernel"].sharding.spec
    assert any(a is not None for a in spec)  # really sharded
    for cfg in (
        prune.PruneConfig(sparsity=0.5, scope="global", include=".*"),
        prune.PruneConfig(sparsity=0.3, scope="per_layer"),
        prune.PruneConfig(sparsity=0.0, pattern="1:2"),  # head_dim 10: o_proj groups of 2
    ):
        paths = prune.pruned_paths(cfg, params)
        fn = jax.jit(lambda p, cfg=cfg, paths=paths: prune.compute_masks(cfg, p, paths, 0))
        a, b = _flat(fn(params)), _flat(fn(sharded))
        assert a.keys() == b.keys() and len(a) >= 7
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{cfg} {k}")


def test_bad_options_fail_clearly():
    params = _params()
    with pytest.raises(ConfigError, match=r"sparsity=1.0 must be in \[0, 1\)"):
        prune.PruneConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match=r"sparsity=-0.1"):
        prune.PruneConfig(sparsity=-0.1)
    with pytest.raises(ConfigError, match="N=5 must satisfy 0 < N < M=4"):
        prune.PruneConfig(sparsity=0.0, pattern="5:4")
    with pytest.raises(ConfigError, match="expected 'unstructured' or 'N:M'"):
        prune.PruneConfig(pattern="half")
    with pytest.raises(ConfigError, match="give sparsity=0.5 or 0"):
        prune.PruneConfig(sparsity=0.3, pattern="2:4")
    with pytest.raises(ConfigError, match="end_step > start_step"):
        prune.PruneConfig(schedule="gradual", start_step=10, end_step=10)
    with pytest.raises(ConfigError, match="scope='layer'"):
        prune.PruneConfig(scope="layer")
    with pytest.raises(ConfigError, match="matches no prunable kernel"):
        prune.pruned_paths(prune.PruneConfig(include="embed.*"), params)
    with pytest.raises(ConfigError, match="not divisible by M=32"):
        prune.pruned_paths(prune.PruneConfig(sparsity=0.0, pattern="16:32"), params)
    with pytest.raises(ConfigError, match="unknown option"):
        prune.parse_prune({"sparsity": 0.5, "sparsty": 0.5})
    assert prune.parse_prune({"sparsity": 0.0}) is None  # off


def _train_cfg(workdir_data, steps=4):
    c = tiny.get_config()
    c.model.overrides = "num_layers=2"
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = steps
    c.train.warmup_steps = 0
    c.train.log_every = 2
    c.checkpoint.save_every = 2
    c.checkpoint.async_save = False
    c.prune.sparsity = 0.5
    c.prune.schedule = "gradual"
    c.prune.end_step = 2
    c.prune.update_every = 1
    return c


def test_training_prunes_and_masks_survive_checkpoints_and_export(tmp_path):
    cfg = _train_cfg(tmp_path)
    last = train.run(cfg, str(tmp_path / "run"))
    assert last["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert 0.3 < last["sparsity/layer_00"] < 0.7 and "sparsity/layer_01" in last
    logged = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    logged = [x for x in logged if "loss" in x]  # not the run's time summary
    assert [round(x["sparsity"], 3) for x in logged] == [0.438, 0.5]  # 7/8 of 0.5, then 0.5

    # Restore equals save, bit for bit; saved params are zero exactly where masked.
    ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", save_every=2, keep=3)
    run_cfg = RunConfig.of(cfg)
    recipe = train.FullTraining(run_cfg)
    setup = train.setup(run_cfg, recipe.model_config)
    _, _, abstract = train_step.abstract_model(
        setup.model_config, run_cfg.model, setup.mesh, setup.rules
    )
    tx = optim.build_optimizer(setup.opt_cfg, run_cfg.prune, abstract)
    shardings = train_step.state_shardings(abstract, tx, setup.mesh)
    mask_sh = prune.find_state(shardings.opt_state).masks["layers"]["mlp"]["up_proj"]["kernel"]
    assert mask_sh.spec == abstract["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec
    step, state, _ = ckpt.restore(train_step.abstract_train_state(abstract, tx, shardings))
    assert step == 4
    masks = _flat(prune.find_state(state.opt_state).masks)
    weights = _flat(state.params)
    for k, m in masks.items():
        assert m.dtype == np.bool_
        np.testing.assert_array_equal(weights[k] == 0, ~m, err_msg=k)

    # Resuming with another prune block is refused (the masks belong to this one).
    cfg.prune.sparsity = 0.6
    cfg.train.steps = 8
    with pytest.raises(ConfigError, match="prune settings"):
        train.run(cfg, str(tmp_path / "run"))

    # A params-only export keeps the zeros (the masks themselves are not exported).
    transforms.export_hf(tmp_path / "run", tmp_path / "hf")
    exported = dict(ModelDir.open(tmp_path / "hf").iter_host_params())
    for k, m in masks.items():
        np.testing.assert_array_equal(exported[k] == 0, ~m, err_msg=k)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    make_hf_model(root / "hf", vocab_size=263, intermediate_size=72, num_key_value_heads=1)
    shutil.copy(TOKENIZER, root / "hf" / "tokenizer.json")
    transforms.convert_hf(root / "hf", root / "converted", mesh=sharding.create_mesh(fsdp=8))
    return root


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "launch.prune", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_one_shot_cli_on_a_converted_checkpoint(converted):
    out = converted / "pruned"
    proc = _cli(f"--model_dir={converted / 'converted'}", f"--out_dir={out}", "--pattern=2:4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sparsity"]["pattern"] == "2:4" and meta["sparsity"]["overall"] == 0.5
    assert meta["sparsity"]["per_layer"] == [0.5, 0.5, 0.5]
    before = dict(ModelDir.open(converted / "converted").iter_host_params())
    after = dict(ModelDir.open(out).iter_host_params())
    for name, w in after.items():
        if name in prune.PRUNABLE and name != "lm_head.kernel":
            groups = np.moveaxis(w != 0, prune.PRUNABLE[name], -1)
            assert (groups.reshape(*groups.shape[:-1], -1, 4).sum(-1) == 2).all(), name
            kept = w != 0
            np.testing.assert_array_equal(w[kept], before[name][kept])
        else:
            np.testing.assert_array_equal(w, before[name], err_msg=name)
    model, _ = model_dir.load_model(out)
    assert np.isfinite(np.asarray(model(np.array([[1, 5, 9, 3]])))).all()

    # Bad options fail with one line and leave nothing behind.
    for args, match in (
        (["--sparsity=1.5"], "must be in [0, 1)"),
        (["--pattern=4:2"], "0 < N < M"),
        (["--include=nothing"], "matches no prunable kernel"),
    ):
        bad = converted / "bad"
        proc = _cli(f"--model_dir={converted / 'converted'}", f"--out_dir={bad}", *args)
        assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]
        assert not bad.exists()


def test_distillation_recovers_into_a_pruned_student(tmp_path, converted):
    from configs import distill_prune_tiny
    from llama_jax.distill import recipe as distill

    c = distill_prune_tiny.get_config(str(converted / "converted"))
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = 3
    c.train.log_every = 3
    c.checkpoint.async_save = False
    c.prune.pattern = "2:4"
    c.prune.sparsity = 0.5
    c.prune.schedule = "one_shot"
    last = distill.run(c, str(tmp_path / "kd"))
    assert last["sparsity"] == 0.5 and np.isfinite(last["loss"])
    for name, w in ModelDir.open(tmp_path / "kd").iter_host_params():
        if name in prune.PRUNABLE and name != "lm_head.kernel":
            groups = np.moveaxis(w != 0, prune.PRUNABLE[name], -1)
            assert (groups.reshape(*groups.shape[:-1], -1, 4).sum(-1) == 2).all(), name

    c.prune.pattern = "3:2"
    with pytest.raises(ConfigError, match="0 < N < M"):
        distill.run(c, str(tmp_path / "kd2"))
    assert not (tmp_path / "kd2" / "checkpoints").exists()
