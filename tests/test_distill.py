"""Distillation: the trainer end to end, resume, the teacher's identity, and the demo."""

import os
import shutil
from pathlib import Path

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hf_models import make_hf_model

from configs import distill_tiny
from llama_jax.distill import recipe as distill
from llama_jax.distill import step as distill_step
from llama_jax.errors import ConfigError
from llama_jax.formats import ModelDir, runs, transforms

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two random 3-layer teachers with the bundled tokenizer's vocabulary (263)."""
    root = tmp_path_factory.mktemp("teachers")
    for seed in (0, 1):
        make_hf_model(root / f"t{seed}", seed=seed, vocab_size=263, num_key_value_heads=1)
    return root / "t0", root / "t1"


def _cfg(teacher, steps=8, **distill_overrides):
    c = distill_tiny.get_config(str(teacher))
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.train.steps = steps
    c.train.warmup_steps = 2
    c.train.log_every = 4
    c.checkpoint.save_every = 4
    c.checkpoint.async_save = False
    for k, v in distill_overrides.items():
        c.distill[k] = v
    return c


def _state_tree(step_dir):
    return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))


def test_resume_is_exact_teacher_never_saved_and_another_teacher_refused(tmp_path, teachers):
    cfg = _cfg(teachers[0], kind="jsd", alpha_end=1.0, temperature=2.0, top_k=7)
    work = tmp_path / "run"
    first = distill.run(cfg, str(work))
    assert np.isfinite(first["loss"]) and first["kd"] > 0
    # The last step (index 7 of 8) runs at alpha 0.5 + (1 - 0.5) * 7 / 8.
    assert first["alpha"] == pytest.approx(0.9375) and first["temperature"] == 2.0
    straight = _state_tree(work / "checkpoints" / "8")

    # The checkpoint holds the student's training state only.
    assert set(straight) == {"step", "params", "opt_state"}
    student = ModelDir.open(work).config
    assert student.num_layers == 2 and student.embed_dim == 32
    q = straight["params"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 32, 4, 8)
    meta = runs.latest_meta(work)
    assert meta["teacher"]["source"] == str(teachers[0])
    assert meta["teacher"]["fingerprint"]["params"]

    # Losing the last checkpoint (a kill after step 4's save) and rerunning gives the
    # same step-8 state, bit for bit.
    shutil.rmtree(work / "checkpoints" / "8")
    distill.run(cfg, str(work))
    resumed = _state_tree(work / "checkpoints" / "8")
    chex.assert_trees_all_equal(straight, resumed)

    shutil.rmtree(work / "checkpoints" / "8")
    with pytest.raises(ConfigError, match="other weights"):
        distill.run(
            _cfg(teachers[1], kind="jsd", alpha_end=1.0, temperature=2.0, top_k=7), str(work)
        )
    assert not (work / "checkpoints" / "8").exists()


def test_student_from_teacher_layers_and_eval(tmp_path, teachers):
    cfg = _cfg(teachers[0], steps=1, eval_path=str(REPO / "configs/data/tiny_corpus.txt"))
    cfg.model.overrides = ""
    cfg.model.teacher_layers = "0,2"
    # Warmup starts at a zero learning rate: step 1 leaves the initial weights.
    last = distill.run(cfg, str(tmp_path / "run"))
    assert last["eval_ppl"] > 1 and last["teacher_eval_ppl"] > 1
    config = ModelDir.open(tmp_path / "run").config
    teacher_config = ModelDir.open(teachers[0]).config
    assert config.num_layers == 2 and config.embed_dim == teacher_config.embed_dim
    student = dict(ModelDir.open(tmp_path / "run").iter_host_params())
    teacher = dict(ModelDir.open(teachers[0]).iter_host_params())
    for name, value in student.items():
        want = teacher[name][[0, 2]] if name.startswith("layers.") else teacher[name]
        np.testing.assert_array_equal(value, want.astype(value.dtype), err_msg=name)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.model.update(overrides="vocab_size=300"), "student vocabulary 300"),
        (lambda c: c.teacher.update(model_dir="/nonexistent"), "does not exist"),
        (lambda c: c.distill.update(temperature=0.0), "temperature=0.0"),
        (lambda c: c.distill.update(kind="kl"), "kind='kl'"),
        (lambda c: c.model.update(teacher_layers="0,7"), r"picks \[0, 7\]"),
        (lambda c: c.distill.update(eval_path="/missing.txt"), "eval_path"),
        (lambda c: c.distill.update(features="0:9"), r"teacher layer\(s\) \[9\]"),
        (lambda c: c.distill.update(features="2:0"), r"student layer\(s\) \[2\]"),
        (lambda c: c.distill.update(features="0-1"), "STUDENT_LAYER:TEACHER_LAYER"),
        (
            lambda c: c.distill.update(features="0:0", feature_projection="never"),
            "width 32 is not the teacher's 40",
        ),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, teachers, change, message):
    cfg = _cfg(teachers[0])
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        distill.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_feature_distance_by_hand():
    rng = np.random.RandomState(0)
    s, t = rng.randn(2, 3, 5, 4).astype(np.float32), rng.randn(2, 3, 5, 6).astype(np.float32)
    kernel = rng.randn(2, 4, 6).astype(np.float32)
    match = distill_step.FeatureMatch((0, 1), (0, 1), mse=0.7, cosine=0.3, projected=True)
    got = np.asarray(distill_step.feature_distance(s, t, kernel, match))
    p = np.einsum("mbtd,mde->mbte", s, kernel)
    mse = ((p - t) ** 2).mean(axis=(0, 3))
    cos = (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(got, 0.7 * mse + 0.3 * (1 - cos).mean(0), rtol=1e-5)


def test_feature_distillation_matches_the_mapped_layers(tmp_path, teachers):
    # A student made of teacher layers 0 and 2: its layer 0 is the teacher's layer 0 on
    # the same input, so their outputs match exactly; its layer 1 (the teacher's layer
    # 2) sees another input than the teacher's layer 2 does.
    def first_step(features):
        cfg = _cfg(teachers[0], steps=1, features=features)
        cfg.model.overrides = ""
        cfg.model.teacher_layers = "0,2"
        cfg.model.dtype = "float32"
        return distill.run(cfg, str(tmp_path / features.replace(":", "_")))

    assert first_step("0:0")["feature"] < 1e-8
    assert first_step("1:2")["feature"] > 1e-3

    # Different widths (32 vs 40) train a projection, which the run's readers drop.
    cfg = _cfg(teachers[0], steps=4, features="0:1,1:2", feature_cosine=0.5)
    last = distill.run(cfg, str(tmp_path / "projected"))
    assert np.isfinite(last["loss"]) and last["feature"] > 0
    params = _state_tree(tmp_path / "projected" / "checkpoints" / "4")["params"]
    assert params[distill_step.PROJECTION]["kernel"].shape == (2, 32, 40)
    names = {n for n, _ in ModelDir.open(tmp_path / "projected").iter_host_params()}
    assert names and not any(distill_step.PROJECTION in n for n in names)


def test_demo_small_kd_student_beats_ce_student(tmp_path):
    from launch import demo

    summary = demo.run(str(tmp_path), "small")
    results = summary["results"]
    assert results["student_kd"]["eval_ppl"] < results["student_ce"]["eval_ppl"]
    assert results["teacher"]["eval_ppl"] < results["student_kd"]["eval_ppl"]
    png = Path(summary["loss_curves"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for run in ("teacher", "student_kd", "student_ce"):
        assert ModelDir.open(tmp_path / run).kind == "run"
    assert all(len(r["samples"]) == 3 for r in results.values())


def test_an_int8_teacher_distils(tmp_path, teachers):
    from llama_jax import sharding

    teacher = tmp_path / "teacher-int8"
    transforms.quantize_dir(
        teachers[0],
        teacher,
        mesh=sharding.create_mesh(fsdp=8),
        tokenizer=str(REPO / "configs/data"),
    )
    last = distill.run(_cfg(teacher, steps=2), str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and last["kd"] > 0
    meta = runs.latest_meta(tmp_path / "run")
    assert meta["teacher"]["source"] == str(teacher)


def test_a_lora_student_distils_on_policy_and_resumes(tmp_path, teachers):
    base = tmp_path / "base"
    make_hf_model(base, seed=3, vocab_size=263, num_key_value_heads=1, num_hidden_layers=2)
    cfg = _cfg(teachers[0], steps=4, alpha=1.0)
    cfg.model.overrides = ""
    cfg.model.model_dir = str(base)
    cfg.model.dtype = "float32"
    cfg.lora.rank = 4
    cfg.distill.on_policy.update(dict(max_new_tokens=8, min_prompt=4, lmbda=0.5, beta=0.5))
    work = tmp_path / "run"
    first = distill.run(cfg, str(work))
    assert np.isfinite(first["loss"]) and 0 < first["onpolicy_fraction"] <= 1
    state = _state_tree(work / "checkpoints" / "4")
    flat = {"/".join(k) for k in _paths(state["params"])}
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    meta = runs.latest_meta(work)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base"]["path"] == str(base.resolve())
    assert meta["teacher"]["source"] == str(teachers[0])
    # The run reads as a model: its adapters merged onto the base.
    merged = dict(ModelDir.open(work).iter_host_params())
    original = dict(ModelDir.open(base).iter_host_params())
    assert not np.array_equal(
        merged["layers.attn.q_proj.kernel"], original["layers.attn.q_proj.kernel"]
    )
    np.testing.assert_array_equal(
        merged["layers.mlp.up_proj.kernel"], original["layers.mlp.up_proj.kernel"]
    )

    shutil.rmtree(work / "checkpoints" / "4")
    distill.run(cfg, str(work))
    chex.assert_trees_all_equal(state, _state_tree(work / "checkpoints" / "4"))


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,)
