"""Hugging Face -> converted model directory -> Hugging Face, and reading every kind of
model directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import torch
import transformers
from hf_models import make_hf_model, rewrite_config
from safetensors.numpy import load_file, save_file

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import CheckpointError
from llama_jax.formats import ModelDir, model_dir, transforms
from llama_jax.formats.hf import safetensors_file

REPO = str(Path(__file__).parents[1])
TOKENIZER = os.path.join(REPO, "configs", "data", "tokenizer.json")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_dir(path, **kwargs):
    model = make_hf_model(path, **kwargs)
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.json"))
    return model


def _logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.float().numpy()


def _tokens(vocab, shape=(2, 19)):
    return np.random.RandomState(0).randint(0, vocab, shape)


def _no_output(out):
    out = Path(out)
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize(
    "dtype,overrides",
    [
        (
            torch.float32,
            dict(num_key_value_heads=1, rope_scaling=LLAMA3_ROPE, max_shard_size="30KB"),
        ),
        (torch.bfloat16, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    ],
    ids=["float32-sharded", "bfloat16-tied-biases"],
)
def test_round_trip_is_bitwise_and_transformers_loads_it(tmp_path, dtype, overrides):
    source = _hf_dir(tmp_path / "hf", dtype=dtype, **overrides)
    out, back = tmp_path / "converted", tmp_path / "back"
    transforms.convert_hf(tmp_path / "hf", out, mesh=sharding.create_mesh(fsdp=2, tensor=4))

    meta = json.loads((out / "metadata.json").read_text())
    want = "float32" if dtype == torch.float32 else "bfloat16"
    assert meta["dtype"] == meta["source_dtype"] == want
    assert meta["source"]["kind"] == "huggingface" and meta["quantization"] is None
    assert sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "metadata.json",
        "params",
        "tokenizer.json",
    ]

    transforms.export_hf(out, back, max_shard_size=20_000)
    src, dst = (
        safetensors_file.open_safetensors_dir(str(tmp_path / "hf")),
        safetensors_file.open_safetensors_dir(str(back)),
    )
    assert set(dst) == set(src)
    assert len({f.path for f in dst.values()}) > 1, "expected a sharded export with an index"
    for name in src:
        a, b = src[name].get(name), dst[name].get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    assert LlamaConfig.from_json_file(back / "config.json") == LlamaConfig.from_json_file(
        tmp_path / "hf" / "config.json"
    )
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back, dtype=dtype).eval()
    tokens = _tokens(source.config.vocab_size)
    # The weights are bitwise equal; the forward passes may still pick different
    # attention kernels (eager in the source, SDPA after loading), which round apart
    # in bfloat16.
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    np.testing.assert_allclose(_logits(reloaded, tokens), _logits(source, tokens), atol=atol)


def test_converted_model_restores_on_other_meshes_with_transformers_logits(tmp_path):
    source = _hf_dir(tmp_path / "hf", num_key_value_heads=1, rope_scaling=LLAMA3_ROPE)
    out = tmp_path / "converted"
    transforms.convert_hf(tmp_path / "hf", out, mesh=sharding.create_mesh(fsdp=8))
    tokens = _tokens(source.config.vocab_size)
    ref = _logits(source, tokens)
    results = []
    for mesh in (None, sharding.create_mesh(fsdp=2, tensor=4), sharding.create_mesh(tensor=8)):
        model, _ = model_dir.load_model(out, mesh=mesh)
        results.append(np.asarray(model(tokens)))
    assert np.abs(ref).max() > 0.5
    for logits in results:
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, results[0], atol=1e-5, rtol=0)


_CONVERT_WORKER = [sys.executable, "-m", "convert.hf_to_orbax"]


def _env(devices):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_two_process_conversion_equals_one_process(tmp_path):
    _hf_dir(tmp_path / "hf", num_key_value_heads=1, max_shard_size="30KB")
    port = processes.free_port()
    common = [f"--hf_dir={tmp_path / 'hf'}", "--mesh=fsdp=4,tensor=2"]
    processes.run_together(
        [
            [
                *_CONVERT_WORKER,
                *common,
                f"--out_dir={tmp_path / 'two'}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            for i in range(2)
        ],
        env=_env(4),
    )
    one = subprocess.run(
        [*_CONVERT_WORKER, *common, f"--out_dir={tmp_path / 'one'}"],
        cwd=REPO,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "converting: " in one.stderr and "tensors" in one.stderr
    a = dict(ModelDir.open(tmp_path / "one").iter_host_params())
    b = dict(ModelDir.open(tmp_path / "two").iter_host_params())
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# --- bad input ---------------------------------------------------------------


def _rewrite_weights(directory, fn):
    path = os.path.join(directory, "model.safetensors")
    tensors = fn(load_file(path))
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})


def _missing(d):
    _rewrite_weights(d, lambda t: {k: v for k, v in t.items() if "1.mlp.up_proj" not in k})


def _extra(d):
    _rewrite_weights(d, lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})


def _wrong_shape(d):
    name = "model.layers.2.self_attn.o_proj.weight"
    _rewrite_weights(d, lambda t: {**t, name: t[name][:, :-1].copy()})


def _int_dtype(d):
    name = "model.norm.weight"
    _rewrite_weights(d, lambda t: {**t, name: t[name].astype(np.int32)})


def _truncated(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _corrupt_header(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")


def _yarn(d):
    rewrite_config(d, lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def _mistral(d):
    rewrite_config(d, lambda c: {**c, "architectures": ["MistralForCausalLM"]})


def _no_tokenizer(d):
    os.remove(os.path.join(d, "tokenizer.json"))


def _pickle_only(d):
    os.remove(os.path.join(d, "model.safetensors"))
    Path(d, "pytorch_model.bin").write_bytes(b"\x80\x04not really")


BAD = {
    "missing tensor": (_missing, r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"),
    "extra tensor": (_extra, r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight"),
    "wrong shape": (_wrong_shape, r"o_proj\.weight' has shape \[40, 39\]; expected \[40, 40\]"),
    "int dtype": (_int_dtype, r"model\.norm\.weight' has dtype int32"),
    "truncated": (_truncated, r"model\.safetensors: truncated safetensors file"),
    "corrupt header": (_corrupt_header, r"model\.safetensors: corrupt safetensors header"),
    "yarn rope": (_yarn, r"rope_type='yarn' is not supported"),
    "architecture": (_mistral, r"MistralForCausalLM"),
    "no tokenizer": (_no_tokenizer, r"has no tokenizer"),
    "pickle": (_pickle_only, r"pytorch_model\.bin.*refused"),
}


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "hf"
    _hf_dir(d)
    return d


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_writing_anything(tmp_path, good_hf, case):
    corrupt, message = BAD[case]
    shutil.copytree(good_hf, tmp_path / "hf")
    corrupt(tmp_path / "hf")
    out = tmp_path / "converted"
    with pytest.raises(CheckpointError, match=message):
        transforms.convert_hf(tmp_path / "hf", out, mesh=sharding.create_mesh(fsdp=8))
    assert _no_output(out)


def test_existing_output_needs_overwrite_and_survives_a_failed_overwrite(tmp_path, good_hf):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    mesh = sharding.create_mesh(fsdp=8)
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        transforms.convert_hf(good_hf, out, mesh=mesh)
    # A directory this project did not write is never replaced, --overwrite or not.
    with pytest.raises(CheckpointError, match="holds files this project did not write"):
        transforms.convert_hf(good_hf, out, mesh=mesh, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    transforms.convert_hf(good_hf, out, mesh=mesh, overwrite=True)  # an empty directory
    written = sorted(os.listdir(out))
    shutil.copytree(good_hf, tmp_path / "bad")
    _truncated(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="truncated"):
        transforms.convert_hf(tmp_path / "bad", out, mesh=mesh, overwrite=True)
    assert sorted(os.listdir(out)) == written
    transforms.convert_hf(good_hf, out, mesh=mesh, overwrite=True)
    assert (out / "params").is_dir()
    assert not list(tmp_path.glob(".converted.*"))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [*_CONVERT_WORKER, f"--hf_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert _no_output(tmp_path / "out")


def test_export_needs_a_tokenizer_and_a_known_dtype(tmp_path, good_hf):
    out = tmp_path / "converted"
    transforms.convert_hf(good_hf, out, mesh=sharding.create_mesh(fsdp=8))
    os.remove(out / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no tokenizer to ship"):
        transforms.export_hf(out, tmp_path / "back")
    with pytest.raises(CheckpointError, match="dtype='int8'"):
        transforms.export_hf(out, tmp_path / "back", dtype="int8", tokenizer=TOKENIZER)
    assert _no_output(tmp_path / "back")
    transforms.export_hf(out, tmp_path / "back", dtype="bfloat16", tokenizer=TOKENIZER)
    tensors = safetensors_file.open_safetensors_dir(str(tmp_path / "back"))
    assert {str(f.dtype(n)) for n, f in tensors.items()} == {"bfloat16"}


def test_a_training_run_starts_from_a_converted_model_and_exports_to_transformers(tmp_path):
    # The project tokenizer has 256 ids; a model with more is fine.
    _hf_dir(tmp_path / "hf", vocab_size=263, num_key_value_heads=1)
    converted = tmp_path / "converted"
    transforms.convert_hf(tmp_path / "hf", converted, mesh=sharding.create_mesh(fsdp=8))
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/tiny.py",
            f"--workdir={run}",
            f"--config.model.model_dir={converted}",
            "--config.model.dtype=float32",
            "--config.data.global_batch=8",
            "--config.data.seq_len=32",
            "--config.train.steps=2",
            "--config.train.learning_rate=1e-3",
        ],
        cwd=REPO,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ModelDir.open(run).kind == "run"
    assert ModelDir.open(run).config == ModelDir.open(converted).config
    start = dict(ModelDir.open(converted).iter_host_params())
    trained = dict(ModelDir.open(run).iter_host_params())
    assert start.keys() == trained.keys()
    changed = [n for n in start if not np.array_equal(start[n], trained[n])]
    assert changed, "two AdamW steps changed nothing"
    # Small steps from the converted weights, not a fresh random model.
    for n in start:
        assert np.abs(start[n] - trained[n]).max() < 0.01, n

    back = tmp_path / "back"
    transforms.export_hf(run, back)
    assert (back / "tokenizer.json").exists()
    exported = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    ours, _ = model_dir.load_model(run)
    tokens = _tokens(263)
    np.testing.assert_allclose(np.asarray(ours(tokens)), _logits(exported, tokens), atol=1e-4)


def test_generate_cli_reads_a_converted_directory_like_the_source(tmp_path):
    _hf_dir(tmp_path / "hf", vocab_size=263)
    converted = tmp_path / "converted"
    transforms.convert_hf(tmp_path / "hf", converted, mesh=sharding.create_mesh(fsdp=8))
    outputs = []
    for d in (tmp_path / "hf", converted):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.generate",
                f"--model_dir={d}",
                "--prompt=the cat",
                "--max_new_tokens=12",
                "--dtype=float32",
            ],
            cwd=REPO,
            env=_env(1),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] and outputs[0].strip()
