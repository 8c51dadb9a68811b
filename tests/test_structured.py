"""Structured pruning: importance equal to measurements taken on transformers with hooks,
the units kept, slices of the source's weights, transformers running the exported
pruned model with llama_jax's logits (width and depth, tied and untied, GQA groups
whole), the same result on any mesh, the CLI, and bad input refused before loading."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from llama_jax import nn, sharding, tree
from llama_jax.compress import structured
from llama_jax.config import get_preset
from llama_jax.distill.spec import typed_config
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.formats import ModelDir, model_dir, runs, structured_dir, transforms
from tests.hf_models import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "configs", "data", "tokenizer.json")
CORPUS = os.path.join(REPO, "configs", "data", "tiny_corpus.txt")
# GQA with G = 3 and H != D / N, so a head or group mix-up changes every shape.
ARCH = dict(
    vocab_size=263,
    hidden_size=42,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=10,
    intermediate_size=74,
    num_hidden_layers=4,
)
CAL_ROWS, CAL_LEN = 16, 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An untied converted model and calibration rows of random tokens (one segment
    per row, so transformers without segment masks sees the same thing)."""
    root = tmp_path_factory.mktemp("structured")
    make_hf_model(root / "hf", seed=1, **ARCH)
    shutil.copy(TOKENIZER, root / "hf" / "tokenizer.json")
    transforms.convert_hf(root / "hf", root / "converted", mesh=sharding.create_mesh(fsdp=8))
    rows = np.random.default_rng(0).integers(3, 263, size=(CAL_ROWS, CAL_LEN))
    np.save(root / "cal.npy", rows.astype(np.int32))
    return root


def _spec(root, **kw):
    base = dict(
        calibration_data=str(root / "cal.npy"),
        calibration_batches=2,
        calibration_batch_size=CAL_ROWS // 2,
        calibration_seq_len=CAL_LEN,
    )
    return structured.StructuredConfig(**(base | kw))


def _hf_reference(hf_dir, rows):
    """Importance measured on transformers with forward hooks: mean over a row's tokens,
    L2 over rows (the default aggregation), per layer; block influence; mean token loss
    of the whole model and with each layer removed."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    n, h = ARCH["num_attention_heads"], ARCH["head_dim"]
    seen = {}

    def keep(key, value):
        seen.setdefault(key, []).append(value.detach().double())

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks += [
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: keep(("heads", i), a[0].reshape(*a[0].shape[:2], n, h))
            ),
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: keep(("mlp", i), a[0])),
            layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: keep(("n1", i), o)),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, i=i: keep(("n2", i), o)
            ),
            layer.register_forward_hook(
                lambda m, a, o, i=i: keep(("cos", i), torch.cosine_similarity(a[0], o, dim=-1))
            ),
        ]
    tokens = torch.tensor(rows, dtype=torch.long)

    def mean_loss(m):
        with torch.no_grad():
            logits = m(tokens).logits.double()
        return float(
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        )

    loss = mean_loss(model)
    for hook in hooks:
        hook.remove()

    def l2_of_means(values_BTC):
        return np.sqrt(((values_BTC.mean(dim=1)) ** 2).sum(dim=0).numpy())

    num_layers = ARCH["num_hidden_layers"]
    ref = dict(
        heads=np.stack([l2_of_means(seen["heads", i][0].norm(dim=-1)) for i in range(num_layers)]),
        mlp=np.stack([l2_of_means(seen["mlp", i][0].abs()) for i in range(num_layers)]),
        embed=np.stack(
            [
                l2_of_means(seen["n1", i][0].abs()) + l2_of_means(seen["n2", i][0].abs())
                for i in range(num_layers)
            ]
        ),
        block_influence=np.array([1 - float(seen["cos", i][0].mean()) for i in range(num_layers)]),
        loss=loss,
    )
    without = []
    layers = model.model.layers
    for i in range(num_layers):
        model.model.layers = torch.nn.ModuleList([x for j, x in enumerate(layers) if j != i])
        without.append(mean_loss(model))
    ref["loss_without"] = np.array(without)
    return ref


def _logits_parity(pruned_dir, export_dir, tokens):
    """llama_jax's logits of a model directory and transformers' of its export."""
    transforms.export_hf(pruned_dir, export_dir)
    model, _ = model_dir.load_model(pruned_dir)
    ours = np.asarray(model(tokens))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = theirs.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    return ours


def _top(scores, k):
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def test_width_and_depth_pruning_keeps_the_most_important_units(source, tmp_path):
    spec = _spec(source, num_layers=3, num_heads=4, mlp_dim=50, embed_dim=32)
    out = tmp_path / "pruned"
    pruned = structured_dir.structured_prune_dir(
        source / "converted", out, spec, mesh=sharding.create_mesh(fsdp=8)
    )
    config = ModelDir.open(out).config
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (3, 4, 2)
    assert (config.mlp_dim, config.embed_dim, config.head_dim) == (50, 32, 10)
    assert config.rope_theta == pruned.source_config.rope_theta
    meta = json.loads((out / "metadata.json").read_text())["structured"]
    assert meta["num_params"] == config.num_params() < meta["num_params_source"]

    # Every score is what hooks on transformers measure on the same rows.
    saved = structured_dir.read_scores(out)
    ref = _hf_reference(source / "hf", np.load(source / "cal.npy"))
    for name in ("heads", "mlp", "embed", "block_influence", "loss_without"):
        np.testing.assert_allclose(saved[name], ref[name], rtol=2e-4, atol=1e-6, err_msg=name)
    assert pruned.scores.loss == pytest.approx(ref["loss"], rel=1e-5)

    # The kept units are the best ones; a kv head keeps its best query heads.
    layers = _top(saved["loss_without"] - ref["loss"], 3)
    np.testing.assert_array_equal(saved["kept_layers"], layers)
    np.testing.assert_array_equal(saved["kept_kv_heads"], [[0, 1]] * 3)
    for row, layer in enumerate(layers):
        groups = saved["heads"][layer].reshape(2, 3)
        heads = [3 * k + j for k in (0, 1) for j in _top(groups[k], 2)]
        np.testing.assert_array_equal(saved["kept_heads"][row], heads)
        np.testing.assert_array_equal(saved["kept_mlp"][row], _top(saved["mlp"][layer], 50))
    embed = _top(saved["embed"][layers].sum(0), 32)
    np.testing.assert_array_equal(saved["kept_embed"], embed)

    # The weights are the source's at those indices.
    before = dict(ModelDir.open(source / "converted").iter_host_params())
    after = dict(ModelDir.open(out).iter_host_params())
    heads, mlp = saved["kept_heads"], saved["kept_mlp"]
    for row, layer in enumerate(layers):
        q = before["layers.attn.q_proj.kernel"][layer][embed][:, heads[row]]
        np.testing.assert_array_equal(after["layers.attn.q_proj.kernel"][row], q)
        o = before["layers.attn.o_proj.kernel"][layer][heads[row]][..., embed]
        np.testing.assert_array_equal(after["layers.attn.o_proj.kernel"][row], o)
        k = before["layers.attn.k_proj.kernel"][layer][embed]
        np.testing.assert_array_equal(after["layers.attn.k_proj.kernel"][row], k)
        down = before["layers.mlp.down_proj.kernel"][layer][mlp[row]][:, embed]
        np.testing.assert_array_equal(after["layers.mlp.down_proj.kernel"][row], down)
        norm = before["layers.mlp_norm.scale"][layer][embed]
        np.testing.assert_array_equal(after["layers.mlp_norm.scale"][row], norm)
    np.testing.assert_array_equal(after["embed.embedding"], before["embed.embedding"][:, embed])
    np.testing.assert_array_equal(after["lm_head.kernel"], before["lm_head.kernel"][embed])

    tokens = np.random.default_rng(1).integers(3, 263, size=(2, 19))
    _logits_parity(out, tmp_path / "export", tokens)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "launch.prune", "--structured", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prunes_tied_embeddings_and_whole_kv_groups(tmp_path):
    hf = tmp_path / "hf"
    make_hf_model(hf, seed=2, tie_word_embeddings=True, **ARCH)
    shutil.copy(TOKENIZER, hf / "tokenizer.json")
    out = tmp_path / "pruned"
    args = [
        f"--model_dir={hf}",
        f"--out_dir={out}",
        "--num_kv_heads=1",
        "--embed_dim=36",
        "--num_layers=3",
        "--layer_metric=block_influence",
        f"--calibration_data={CORPUS}",
        "--calibration_batches=2",
        "--calibration_batch_size=8",
        "--calibration_seq_len=32",
    ]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = ModelDir.open(out).config
    assert (config.num_heads, config.num_kv_heads, config.embed_dim) == (3, 1, 36)
    assert config.tie_word_embeddings and config.num_layers == 3
    assert f"{config.num_params():,} parameters" in proc.stdout
    saved = structured_dir.read_scores(out)
    # The kept group is the one whose three heads score highest, with all three.
    for row, layer in enumerate(saved["kept_layers"]):
        group = int(np.argmax(saved["heads"][layer].reshape(2, 3).sum(1)))
        assert saved["kept_kv_heads"][row].tolist() == [group]
        assert saved["kept_heads"][row].tolist() == [3 * group, 3 * group + 1, 3 * group + 2]
    np.testing.assert_array_equal(saved["kept_layers"], _top(saved["block_influence"], 3))
    params = dict(ModelDir.open(out).iter_host_params())
    assert "lm_head.kernel" not in params and params["embed.embedding"].shape == (263, 36)
    _logits_parity(out, tmp_path / "export", np.array([[1, 5, 9, 3, 7, 11, 2]]))

    # A dry run prints the ranking and the size, needs no --out_dir and writes nothing.
    before = sorted(os.listdir(tmp_path))
    proc = _cli(*[a for a in args if not a.startswith("--out_dir")], "--dry_run", "--mlp_dim=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "block_influence" in proc.stdout and sorted(os.listdir(tmp_path)) == before
    expected = config.replace(mlp_dim=40).num_params()
    assert f"{expected:,} parameters" in proc.stdout

    proc = _cli(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_pruning_in_memory_is_the_same_on_every_mesh_and_runs_prune_once(source, tmp_path):
    spec = _spec(source, num_layers=2, num_heads=2, mlp_dim=31, layer_metric="block_influence")
    results = []
    for mesh in (
        sharding.create_mesh(devices=jax.devices()[:1]),
        sharding.create_mesh(data=2, fsdp=2, tensor=2),
    ):
        config = ModelDir.open(source / "converted").config
        _, abstract = nn.abstract_params(config, mesh)
        params = ModelDir.open(source / "converted").load_params(abstract)
        batches = structured_dir.calibration_batches(spec, None, mesh, vocab_size=263)
        results.append(structured.prune_params(config, params, spec, batches, mesh=mesh))
    one, many = results
    assert one.config == many.config and one.config.num_heads == 2
    for name, value in one.scores.arrays().items():
        np.testing.assert_allclose(value, many.scores.arrays()[name], rtol=1e-5, err_msg=name)
    for name, value in one.kept.arrays().items():
        np.testing.assert_array_equal(value, many.kept.arrays()[name], err_msg=name)
    flat_one, flat_many = tree.flatten(one.params), tree.flatten(many.params)
    for name, value in flat_one.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_many[name]), name)
    assert flat_many["layers.mlp.up_proj.kernel"].sharding.mesh.shape["tensor"] == 2

    # A run's initial student: pruned once and saved, read back on the next start.
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    config = one.source_config
    _, teacher_abstract = nn.abstract_params(config, mesh)
    teacher = ModelDir.open(source / "converted").load_params(teacher_abstract)
    _, student_abstract = nn.abstract_params(one.config, mesh)
    save = tmp_path / "pruned_student"
    kw = dict(tokenizer=None, mesh=mesh, teacher_source=str(source / "converted"))
    first = structured_dir.load_or_prune(save, spec, config, teacher, student_abstract, **kw)

    def no_second_pruning(*args, **kwargs):
        raise AssertionError("pruned again")

    original = structured_dir.prune_params
    structured_dir.prune_params = no_second_pruning
    try:
        again = structured_dir.load_or_prune(save, spec, config, teacher, student_abstract, **kw)
    finally:
        structured_dir.prune_params = original
    for name, value in tree.flatten(first).items():
        np.testing.assert_array_equal(np.asarray(value), flat_one[name], name)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(tree.flatten(again)[name]))


@pytest.mark.parametrize(
    "targets, error, match",
    [
        (dict(num_layers=9), ConfigError, "larger than the source's 4"),
        (dict(num_heads=5), ConfigError, "cannot keep GQA groups whole"),
        (dict(num_heads=4, num_kv_heads=1), ConfigError, "4 query heads per kv head"),
        (dict(num_heads=3, num_kv_heads=2), ConfigError, "not a multiple of num_kv_heads=2"),
        (dict(), ConfigError, "at least one target size"),
        (dict(mlp_dim=40, calibration_data=""), DataError, "calibration data"),
        (dict(mlp_dim=40, calibration_data="/nonexistent.txt"), DataError, "does not exist"),
        (dict(mlp_dim=40, calibration_batches=3), DataError, "ask for 24 rows"),
    ],
)
def test_bad_targets_and_calibration_fail_before_loading(
    source, tmp_path, monkeypatch, targets, error, match
):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(ModelDir, "load_params", no_loading)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        structured_dir.structured_prune_dir(
            source / "converted", out, _spec(source, **targets), mesh=sharding.create_mesh()
        )
    assert not out.exists()


def test_quantized_and_existing_outputs_are_refused(source, tmp_path):
    mesh = sharding.create_mesh()
    quantized = tmp_path / "int8"
    transforms.quantize_dir(source / "converted", quantized, mesh=mesh)
    with pytest.raises(CheckpointError, match="quantized"):
        structured_dir.structured_prune_dir(
            quantized, tmp_path / "out", _spec(source, mlp_dim=40), mesh=mesh
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="already exists"):
        structured_dir.structured_prune_dir(
            source / "converted", quantized, _spec(source, mlp_dim=40), mesh=mesh
        )


@pytest.mark.parametrize(
    "name, teacher",
    [
        ("distill_minitron_tiny", "tiny"),
        ("distill_minitron_llama3_2_1b", "llama3.2-1b"),
        ("distill_minitron_llama3_8b_pod", "llama3.1-8b"),
    ],
)
def test_minitron_configs_compile_the_shape_pruning_gives(name, teacher):
    c = importlib.import_module(f"configs.{name}").get_config("data.jsonl")
    spec = structured.parse_structured(c.structured.to_dict())
    pruned = structured.target_config(get_preset(teacher), spec)
    # The student's preset and overrides (what ahead-of-time compilation builds) are
    # the architecture structured pruning of that teacher gives.
    assert typed_config(c).model.preset_config() == pruned
    assert pruned.embed_dim % pruned.num_heads == 0  # transformers loads the export
    assert pruned.num_params() < 0.65 * get_preset(teacher).num_params()


def test_prune_then_distil_in_one_launch_prunes_once(source, tmp_path):
    from configs import distill_tiny
    from configs.base import structured_section
    from llama_jax.distill import recipe as distill

    c = distill_tiny.get_config(str(source / "converted"))
    c.model.overrides = ""
    c.model.dtype = "float32"
    c.teacher.dtype = "float32"
    c.data.seq_len, c.data.global_batch = 32, 8
    c.train.steps, c.train.warmup_steps, c.train.log_every = 1, 1, 1
    c.checkpoint.async_save = False
    c.structured = structured_section(
        num_heads=4,
        mlp_dim=40,
        embed_dim=30,
        calibration_batches=2,
        calibration_batch_size=8,
        calibration_seq_len=32,
        layer_metric="block_influence",
    )
    work = tmp_path / "run"
    distill.run(c, str(work))
    pruned = work / "pruned_student"
    config = ModelDir.open(pruned).config
    assert (config.num_heads, config.num_kv_heads, config.mlp_dim, config.embed_dim) == (
        4,
        2,
        40,
        30,
    )
    assert ModelDir.open(work).config == config
    # Step 1 runs at a zero learning rate: the checkpoint holds the pruned teacher.
    saved = dict(ModelDir.open(work).iter_host_params())
    for name, value in ModelDir.open(pruned).iter_host_params():
        np.testing.assert_array_equal(saved[name], value.astype(saved[name].dtype), err_msg=name)
    assert runs.latest_meta(work)["structured"]["mlp_dim"] == 40

    # A resume starts from the checkpoint and never prunes again.
    shutil.rmtree(pruned)
    c.train.steps = 2
    distill.run(c, str(work))
    assert not pruned.exists() and (work / "checkpoints" / "2").exists()

    c.model.model_dir = str(source / "converted")
    with pytest.raises(ConfigError, match="starts as the pruned teacher"):
        distill.run(c, str(tmp_path / "other"))
