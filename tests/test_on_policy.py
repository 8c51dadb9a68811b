"""On-policy distillation: the student's own samples, scored by the teacher."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hf_models import make_hf_model

from configs import distill_tiny
from llama_jax.distill import on_policy
from llama_jax.distill import recipe as distill
from llama_jax.distill.spec import DistillConfig, OnPolicySpec
from llama_jax.errors import ConfigError, DataError
from llama_jax.formats import ModelDir, model_dir
from llama_jax.nn import generation as generate
from llama_jax.train import loop as train
from llama_jax.train.step import TrainState


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    make_hf_model(root / "t", seed=0, vocab_size=263, num_key_value_heads=1)
    return root / "t"


def _cfg(teacher, steps=2, **on):
    c = distill_tiny.get_config(str(teacher))
    c.data.seq_len = 32
    c.data.global_batch = 8
    c.model.dtype = "float32"
    c.train.steps = steps
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.checkpoint.save_every = 2
    c.checkpoint.async_save = False
    c.distill.alpha = 1.0
    c.distill.temperature = 1.0
    if on:
        c.distill.on_policy.update(dict(max_new_tokens=8, min_prompt=4) | on)
    return c


def _state(step_dir):
    return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))


def test_lmbda_zero_is_off_policy_distillation_with_the_same_divergence(tmp_path, teacher):
    for beta, kind in ((0.0, dict(kind="forward_kl")), (0.3, dict(kind="jsd", beta=0.3))):
        on = distill.run(_cfg(teacher, steps=1, lmbda=0.0, beta=beta), str(tmp_path / f"on{beta}"))
        off_cfg = _cfg(teacher, steps=1)
        off_cfg.distill.update(kind)
        off = distill.run(off_cfg, str(tmp_path / f"off{beta}"))
        assert on["onpolicy_fraction"] == 0.0 and "completion_len" not in on
        for k in ("loss", "kd", "grad_norm"):
            assert on[k] == off[k], k
        # Reported, not trained on (alpha is 1); the on-policy step also reduces the
        # teacher's NLL, which may regroup the float32 sums.
        assert on["ce"] == pytest.approx(off["ce"], rel=1e-6)
        # The teacher's NLL is reported where samples are scored: on-policy runs only.
        assert np.isfinite(on["teacher_nll"]) and "teacher_nll" not in off


def test_cut_prompts_keep_real_tokens_right_aligned():
    tokens = jnp.arange(1, 25, dtype=jnp.int32).reshape(2, 12)
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 6 + [0] * 6], jnp.int32)
    t, s, p = on_policy.cut_prompts(tokens, segments, jax.random.key(0), prompt_len=8, min_prompt=3)
    t, s, p = map(np.asarray, (t, s, p))
    for row in range(2):
        n = int((s[row] > 0).sum())
        assert 3 <= n <= (8 if row == 0 else 6)
        np.testing.assert_array_equal(t[row, 8 - n :], np.asarray(tokens)[row, :n])
        assert (s[row, : 8 - n] == 0).all() and (t[row, : 8 - n] == 0).all()
    # Positions restart in each document, as the training forward computes them.
    n0 = int((s[0] > 0).sum())
    want = [0, 1, 2, 3, 4, 0, 1, 2][:n0]
    np.testing.assert_array_equal(p[0, 8 - n0 :], want)


def test_samples_follow_the_current_student_and_a_resume_replays_them(tmp_path, teacher):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["the cat", "a b c d", "hello", "zz top", "one two", "x", "tea", "ok go"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    cfg = _cfg(teacher, steps=4, lmbda=1.0, temperature=0.0, prompts=str(prompts))
    work = tmp_path / "run"
    last = distill.run(cfg, str(work))
    assert last["onpolicy_fraction"] == 1.0 and 1 <= last["completion_len"] <= 8
    assert np.isfinite(last["teacher_nll"]) and last["gen_tokens_per_s"] > 0

    # Step 2's samples come from the step-2 student: greedy continuations equal
    # llama_jax.generate's on the parameters the checkpoint holds.
    rc = DistillConfig.of(cfg)
    recipe = distill.Distillation(rc)
    setup = train.setup(rc, recipe.model_config)
    recipe.build(setup)
    recipe.check(setup)
    recipe.load(setup, None)
    config = ModelDir.open(work).config
    model, _ = model_dir.load_model(work / "checkpoints" / "2")
    state = _state(work / "checkpoints" / "2")
    state = TrainState(state["step"], state["params"], state["opt_state"])
    batch = recipe.prepare(2, state, next(setup.iterator))
    tok = setup.tokenizer
    ids = [tok.encode(texts[(2 * 8 + r) % 8]) for r in range(8)]
    want = generate.generate(model, ids, max_new_tokens=8, eos_ids=config.eos_token_ids)
    got = np.asarray(batch["tokens"])[:, 24:]
    mask = np.asarray(batch["loss_mask"])[:, 23:31]
    for row in range(8):
        n = int(mask[row].sum())
        assert n == len(want[row])
        assert got[row, :n].tolist() == want[row]
    again = recipe.prepare(2, state, next(setup.iterator))
    chex.assert_trees_all_equal(batch, again)

    # A run that loses its last checkpoint resamples the same tokens: equal states.
    cfg.distill.on_policy.temperature = 1.0
    sampled = tmp_path / "sampled"
    distill.run(cfg, str(sampled))
    straight = _state(sampled / "checkpoints" / "4")
    shutil.rmtree(sampled / "checkpoints" / "4")
    distill.run(cfg, str(sampled))
    chex.assert_trees_all_equal(straight, _state(sampled / "checkpoints" / "4"))


def test_lmbda_picks_steps_from_the_seed_alone():
    picks = [on_policy.is_on_policy(3, s, 0.25) for s in range(400)]
    assert picks == [on_policy.is_on_policy(3, s, 0.25) for s in range(400)]
    assert 0.18 < np.mean(picks) < 0.32
    assert on_policy.onpolicy_fraction(3, 400, 0.25) == np.mean(picks)
    assert not any(on_policy.is_on_policy(3, s, 0.0) for s in range(50))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.distill.on_policy.update(lmbda=1.5), "lmbda=1.5"),
        (lambda c: c.distill.on_policy.update(beta=-0.1), "beta=-0.1"),
        (lambda c: c.distill.on_policy.update(max_new_tokens=29), "max_new_tokens=29"),
        (lambda c: c.distill.update(alpha=0.5), "alpha=1"),
        (lambda c: c.distill.update(kind="reverse_kl"), "on_policy.beta"),
        (lambda c: c.distill.on_policy.update(prompts="/nope.jsonl"), "does not exist"),
    ],
)
def test_bad_on_policy_settings_are_refused(tmp_path, teacher, edit, match):
    cfg = _cfg(teacher, lmbda=0.5)
    edit(cfg)
    with pytest.raises(ConfigError, match=match):
        distill.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompts_longer_than_the_row_are_refused(tmp_path, teacher):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 60}) + "\n")
    cfg = _cfg(teacher, lmbda=1.0, prompts=str(prompts))
    with pytest.raises(DataError, match="prompts must have 1 to 24"):
        distill.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert OnPolicySpec().max_new_tokens == 0  # off unless asked for
