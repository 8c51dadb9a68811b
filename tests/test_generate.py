"""Generation: token-for-token parity with transformers' greedy `generate`, sampling
filters, and the `launch.generate` command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_hf_model

from llama_jax.errors import ConfigError
from llama_jax.formats.model_dir import load_hf
from llama_jax.nn.generation import Sampling, check_length, generate, sample_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen")
    hf_model = make_hf_model(
        directory,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    model, _ = load_hf(directory)
    return hf_model, model, directory


def test_greedy_matches_transformers_for_prompts_of_different_lengths(models):
    hf_model, model, _ = models
    rs = np.random.RandomState(3)
    prompts = [rs.randint(3, 131, n).tolist() for n in (6, 19, 1, 11)]
    t = max(map(len, prompts))
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        )[:, t:].tolist()
    ours = generate(model, prompts, max_new_tokens=32)
    for row_ref, row in zip(ref, ours, strict=True):
        # transformers pads a row after its EOS; ours stops there.
        assert row == row_ref[: len(row)]
        assert all(x == 0 for x in row_ref[len(row) :])
        assert len(row) == 32 or row[-1] == 2
    assert sum(len(r) for r in ours) > 64


def test_each_row_stops_at_its_own_eos(models):
    _, model, _ = models
    prompts = [[5, 6, 7], [9, 10]]
    free = generate(model, prompts, max_new_tokens=12, eos_ids=())
    assert [len(r) for r in free] == [12, 12]
    stop = free[0][3]  # make row 0's 4th token an end-of-sequence token
    stopped = generate(model, prompts, max_new_tokens=12, eos_ids=(stop,))
    first = free[0].index(stop) + 1
    assert stopped[0] == free[0][:first]
    expected1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert stopped[1] == expected1


def test_sampling_is_seeded_and_top_k_one_is_greedy(models):
    _, model, _ = models
    prompts = [[4, 8, 15, 16], [23, 42]]
    hot = Sampling(temperature=1.5)
    a = generate(model, prompts, max_new_tokens=16, sampling=hot, seed=1, eos_ids=())
    b = generate(model, prompts, max_new_tokens=16, sampling=hot, seed=1, eos_ids=())
    c = generate(model, prompts, max_new_tokens=16, sampling=hot, seed=2, eos_ids=())
    assert a == b and a != c
    greedy = generate(model, prompts, max_new_tokens=16, eos_ids=())
    top1 = generate(model, prompts, max_new_tokens=16, sampling=Sampling(2.0, top_k=1), eos_ids=())
    assert top1 == greedy


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]] * 4000))
    keys = jax.random.key(0)
    picks = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_k=2)))
    assert set(picks) == {0, 1}
    assert abs((picks == 0).mean() - 0.5 / 0.8) < 0.03
    # top_p=0.85 keeps 0.5 + 0.3 + 0.1 (mass before the third is 0.8 < 0.85).
    picks = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_p=0.85)))
    assert set(picks) == {0, 1, 2}
    picks = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_p=0.4)))
    assert set(picks) == {0}


def test_bad_generation_arguments(models):
    _, model, _ = models
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"\[500\].*\[0, 131\)"):
        generate(model, [[1, 500]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)
    # The model has 256 positions: 250 prompt tokens leave room for 6 new ones.
    with pytest.raises(
        ConfigError,
        match=r"250 tokens plus max_new_tokens=7 is 257 positions, more than the model's "
        r"max_position_embeddings=256; lower max_new_tokens to at most 6",
    ):
        generate(model, [[5] * 250, [5]], max_new_tokens=7)
    with pytest.raises(ConfigError, match="shorten the prompt"):
        generate(model, [[5] * 256], max_new_tokens=1)
    check_length(250, 6, 256)  # fits exactly


def _write_word_tokenizer(directory):
    """A whole-word tokenizer.json whose 100 ids fit the 131-token test model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:3])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)


def test_generate_command_with_a_few_shot_prompt_file(models, tmp_path):
    hf_model, model, directory = models
    _write_word_tokenizer(directory)
    prompt_file = tmp_path / "few_shot.txt"
    prompt_file.write_text("w5 w6 w7\nw8 w9 w10\nw11 w12")
    cmd = [
        sys.executable,
        "-m",
        "launch.generate",
        f"--model_dir={directory}",
        f"--prompt_file={prompt_file}",
        "--prompt=w3 w4",
        "--max_new_tokens=6",
        "--temperature=0",
        "--dtype=float32",
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same prompts through the library: [BOS] + word ids.
    ids = [[1, 3 + 3, 3 + 4], [1] + [3 + i for i in (5, 6, 7, 8, 9, 10, 11, 12)]]
    expected = generate(model, ids, max_new_tokens=6, eos_ids=(2,))
    out = proc.stdout.split("=== completion ")
    assert len(out) == 3, proc.stdout
    for text, toks in zip(out[1:], expected, strict=True):
        words = text.split("\n", 1)[1].split()
        names = [f"w{t - 3}" if 3 <= t < 100 else None for t in toks if t != 2]
        assert words == [n for n in names if n is not None]


def test_generate_command_rejects_bad_flags(models):
    _, _, directory = models
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [
        sys.executable,
        "-m",
        "launch.generate",
        f"--model_dir={directory}",
        "--top_p=1.5",
        "--prompt=w1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode != 0 and "top_p" in proc.stderr


def test_generate_command_refuses_a_length_past_the_context_before_reading_weights(
    models, tmp_path
):
    _, _, directory = models
    # Config and tokenizer only: reading the weights would fail with another error.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((directory / "config.json").read_text())
    _write_word_tokenizer(bare)
    cmd = [
        sys.executable,
        "-m",
        "launch.generate",
        f"--model_dir={bare}",
        "--prompt=w3 w4 w5",
        "--max_new_tokens=1000000",
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # BOS + three words = 4 tokens.
    assert proc.stderr.startswith(
        "error: a prompt of 4 tokens plus max_new_tokens=1000000 is 1000004 positions, more "
        "than the model's max_position_embeddings=256; lower max_new_tokens to at most 252"
    ), proc.stderr[-3000:]
