"""Bad input to every command, table-driven: each case runs the real command line (the
entry point's flag parsing and error boundary included; several cases of one command
per interpreter, tests/cli_harness.py) and must end with exit status 2 and one
`error:` line naming the value at fault, no traceback, no file created and every input
byte-identical."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import make_hf_model

from llama_jax import formats, sharding

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "configs" / "data" / "tokenizer.json"
CORPUS = REPO / "configs" / "data" / "tiny_corpus.txt"
RUN = REPO / "tests" / "data" / "run_before_redesign"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The inputs every case reads: a Hugging Face directory and its converted copy
    (V=263, with the bundled tokenizer), a training run, a model of another vocabulary,
    a file named like a GGUF file, a text corpus, a file that is not UTF-8, a plain
    file, an empty directory, a directory this project did not write, and a link."""
    r = tmp_path_factory.mktemp("cli")
    make_hf_model(r / "hf", vocab_size=263, max_position_embeddings=256)
    shutil.copy(TOKENIZER, r / "hf" / "tokenizer.json")
    formats.convert_hf(r / "hf", r / "conv", mesh=sharding.create_mesh())
    shutil.copytree(RUN, r / "run")
    make_hf_model(r / "other", vocab_size=131)
    # Read by no case: the checks of a GGUF output or input come before its contents.
    (r / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    shutil.copy(CORPUS, r / "data.txt")
    (r / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (r / "afile.txt").write_text("a file, not a directory\n")
    (r / "adir").mkdir()
    (r / "foreign").mkdir()
    (r / "foreign" / "keep.txt").write_text("someone else's\n")
    (r / "rep.md").mkdir()
    (r / "hf_link").symlink_to(r / "hf")
    return r


# (command, arguments, text the one error line must hold); {r} is the fixture root.
CASES = [
    # convert.hf_to_orbax
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/hf --overwrite", "is the input"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/hf/sub", "is inside the input"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/hf_link --overwrite", "is the input"),
    (
        "convert.hf_to_orbax",
        "--hf_dir={r}/hf/sub/.. --out_dir={r} --overwrite",
        "contains the input",
    ),
    ("convert.hf_to_orbax", "--hf_dir={r}/missing --out_dir={r}/o", "missing"),
    ("convert.hf_to_orbax", "--hf_dir={r}/afile.txt --out_dir={r}/o", "not a directory"),
    (
        "convert.hf_to_orbax",
        "--hf_dir={r}/hf --out_dir={r}/afile.txt",
        "is a file, expected a directory",
    ),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/afile.txt/o", "afile.txt is a file"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/foreign --overwrite", "did not write"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/adir", "already exists"),
    ("convert.hf_to_orbax", "--gguf={r}/adir --out_dir={r}/o", "is a directory, expected a file"),
    ("convert.hf_to_orbax", "--gguf={r}/model.gguf --out_dir={r}/model.gguf", "is the input"),
    ("convert.hf_to_orbax", "--gguf={r}/afile.txt --out_dir={r}/o", "not a readable GGUF"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/o --mesh=fsdp=3", "fsdp"),
    ("convert.hf_to_orbax", "--hf_dir={r}/hf --out_dir={r}/o --quantize_head", "quantization mode"),
    # convert.orbax_to_hf
    ("convert.orbax_to_hf", "--model_dir={r}/conv --out_dir={r}/conv --overwrite", "is the input"),
    ("convert.orbax_to_hf", "--model_dir={r}/conv --out_dir={r}/conv/hf", "is inside the input"),
    (
        "convert.orbax_to_hf",
        "--model_dir={r}/afile.txt --out_dir={r}/o",
        "is a file, expected a model directory",
    ),
    ("convert.orbax_to_hf", "--model_dir={r}/missing --out_dir={r}/o", "missing does not exist"),
    ("convert.orbax_to_hf", "--model_dir={r}/adir --out_dir={r}/o", "is not a model directory"),
    ("convert.orbax_to_hf", "--model_dir={r}/conv --out_dir={r}/o --max_shard_size=lots", "lots"),
    (
        "convert.orbax_to_hf",
        "--model_dir={r}/conv --out_dir={r}/o --tokenizer={r}/nope.json",
        "nope.json does not exist",
    ),
    (
        "convert.orbax_to_hf",
        "--model_dir={r}/conv --out_dir={r}/foreign --overwrite",
        "did not write",
    ),
    # convert.to_gguf
    (
        "convert.to_gguf",
        "--model_dir={r}/hf --out={r}/hf/model.safetensors --overwrite",
        "is inside the input",
    ),
    ("convert.to_gguf", "--model_dir={r}/conv --out={r}/adir", "is a directory, expected a file"),
    ("convert.to_gguf", "--model_dir={r}/conv --out={r}/nowhere/m.gguf", "does not exist"),
    (
        "convert.to_gguf",
        "--model_dir={r}/conv --out={r}/afile.txt --overwrite",
        "not a GGUF file this project wrote",
    ),
    ("convert.to_gguf", "--model_dir={r}/conv --out={r}/model.gguf", "already exists"),
    ("convert.to_gguf", "--model_dir={r}/conv --out=gs://bucket/m.gguf", "local path"),
    (
        "convert.to_gguf",
        "--model_dir={r}/afile.txt --out={r}/m.gguf",
        "is a file, expected a model directory",
    ),
    # launch.quantize
    ("launch.quantize", "--model_dir={r}/conv --out_dir={r}/conv --overwrite", "is the input"),
    ("launch.quantize", "--model_dir={r}/conv --out_dir={r}/conv/q", "is inside the input"),
    ("launch.quantize", "--model_dir={r}/conv --out_dir={r}/o --mode=int4", "int4"),
    ("launch.quantize", "--model_dir={r}/missing --out_dir={r}/o", "missing does not exist"),
    # launch.prune
    ("launch.prune", "--model_dir={r}/conv --out_dir={r}/conv/pruned", "is inside the input"),
    (
        "launch.prune",
        "--structured --model_dir={r}/run --out_dir={r}/run --overwrite --mlp_dim=64 --calibration_data={r}/data.txt",
        "is the input",
    ),
    (
        "launch.prune",
        "--structured --model_dir={r}/conv --out_dir={r}/o --num_heads=0 --mlp_dim=64 --calibration_data={r}/data.txt",
        "--num_heads=0",
    ),
    (
        "launch.prune",
        "--structured --model_dir={r}/conv --out_dir={r}/o --mlp_dim=64 --calibration_data={r}/data.txt --calibration_seq_len=1000",
        "calibration_seq_len=1000",
    ),
    (
        "launch.prune",
        "--structured --model_dir={r}/conv --dry_run --mlp_dim=64 --calibration_data={r}/adir --calibration_seq_len=32",
        "is a directory, expected a text",
    ),
    (
        "launch.prune",
        "--structured --model_dir={r}/conv --dry_run --mlp_dim=9999 --calibration_data={r}/data.txt",
        "mlp_dim=9999",
    ),
    ("launch.prune", "--model_dir={r}/conv --out_dir={r}/o --sparsity=1.5", "1.5"),
    ("launch.prune", "--model_dir={r}/conv --out_dir={r}/o --pattern=5:4", "5:4"),
    (
        "launch.prune",
        "--structured --model_dir={r}/conv --out_dir={r}/o --sparsity=0.5",
        "--sparsity",
    ),
    # launch.merge_lora
    ("launch.merge_lora", "--model_dir={r}/conv --out_dir={r}/o", "not a LoRA run"),
    ("launch.merge_lora", "--model_dir={r}/run --out_dir={r}/run --overwrite", "is the input"),
    # launch.evaluate
    (
        "launch.evaluate",
        "--model_dir={r}/conv --data={r}/data.txt --output={r}/adir",
        "is a directory, expected a file",
    ),
    (
        "launch.evaluate",
        "--model_dir={r}/conv --data={r}/data.txt --report={r}/rep",
        "rep.md is a directory",
    ),
    ("launch.evaluate", "--model_dir={r}/conv, --data={r}/data.txt", "item 2 is empty"),
    (
        "launch.evaluate",
        "--model_dir={r}/conv --data={r}/data.txt --output={r}/data.txt",
        "is the input",
    ),
    ("launch.evaluate", "--model_dir={r}/conv --data={r}/data.txt --seq_len=1000", "1000"),
    ("launch.evaluate", "--model_dir={r}/conv --data={r}/nope.txt", "nope.txt"),
    (
        "launch.evaluate",
        "--model_dir={r}/conv --data={r}/data.txt --output={r}/nowhere/o.jsonl",
        "does not exist",
    ),
    (
        "launch.evaluate",
        "--model_dir={r}/afile.txt --data={r}/data.txt",
        "is a file, expected a model directory",
    ),
    # launch.generate
    (
        "launch.generate",
        "--model_dir={r}/conv --prompt_file={r}/bad.txt --max_new_tokens=2",
        "bad.txt is not UTF-8",
    ),
    (
        "launch.generate",
        "--model_dir={r}/conv --prompt_file={r}/adir --max_new_tokens=2",
        "adir is a directory",
    ),
    (
        "launch.generate",
        "--model_dir={r}/conv --prompt=hi --max_new_tokens=1000",
        "max_new_tokens=1000",
    ),
    (
        "launch.generate",
        "--model_dir={r}/conv --prompt=hi --max_new_tokens=2 --top_p=2",
        "--top_p=2",
    ),
    (
        "launch.generate",
        "--model_dir={r}/missing --prompt=hi --max_new_tokens=2",
        "missing does not exist",
    ),
    # launch.train
    (
        "launch.train",
        "--config=configs/tiny.py --workdir={r}/afile.txt",
        "--workdir={r}/afile.txt is a file",
    ),
    (
        "launch.train",
        "--config=configs/tiny.py --workdir={r}/o --config.train.stepz=3",
        'did you mean "steps"',
    ),
    (
        "launch.train",
        "--config=configs/tiny.py --workdir={r}/o --config.model.model_dir={r}/afile.txt",
        "is a file, expected a model directory",
    ),
    (
        "launch.train",
        "--config=configs/tiny.py --workdir={r}/conv --config.model.model_dir={r}/conv",
        "is the input",
    ),
    ("launch.train", "--config=configs/tiny.py --workdir={r}/o --config.mesh.fsdp=3", "fsdp"),
    (
        "launch.train",
        "--config=configs/tiny.py --workdir={r}/o --config.data.path={r}/nope.txt",
        "nope.txt does not exist",
    ),
    # launch.distill
    (
        "launch.distill",
        "--config=configs/distill_tiny.py:{r}/run --workdir={r}/run",
        "is the input",
    ),
    (
        "launch.distill",
        "--config=configs/distill_tiny.py:{r}/conv --workdir={r}/run",
        "not distillation",
    ),
    (
        "launch.distill",
        "--config=configs/distill_tiny.py:{r}/conv --workdir={r}/o --config.distill.on_policy.lmbda=1.0",
        "max_new_tokens=0",
    ),
    (
        "launch.distill",
        "--config=configs/distill_tiny.py:{r}/conv --workdir={r}/o --config.distill.features=99:3",
        "99",
    ),
    (
        "launch.distill",
        "--config=configs/distill_tiny.py:{r}/afile.txt --workdir={r}/o",
        "is a file, expected a model directory",
    ),
    # launch.teacher_logits
    (
        "launch.teacher_logits",
        "--config=configs/distill_tiny.py --teacher={r}/other --out_dir={r}/c --top_k=4",
        "vocabulary",
    ),
    (
        "launch.teacher_logits",
        "--config=configs/distill_tiny.py --teacher={r}/afile.txt --out_dir={r}/c --top_k=4",
        "is a file, expected a model directory",
    ),
    (
        "launch.teacher_logits",
        "--config=configs/distill_tiny.py --teacher={r}/conv --out_dir={r}/conv --top_k=4",
        "is the input",
    ),
    # launch.prepare_data
    (
        "launch.prepare_data",
        "--inputs={r}/nope*.jsonl --tokenizer={r}/hf --seq_len=32 --out_dir={r}/s",
        "nope*.jsonl",
    ),
    (
        "launch.prepare_data",
        "--inputs={r}/data.txt --tokenizer={r}/hf --seq_len=32 --out_dir={r}/data.txt",
        "is the input",
    ),
    (
        "launch.prepare_data",
        "--inputs={r}/bad.txt --tokenizer={r}/hf --seq_len=32 --out_dir={r}/s",
        "bad.txt",
    ),
    (
        "launch.prepare_data",
        "--inputs={r}/data.txt, --tokenizer={r}/hf --seq_len=32 --out_dir={r}/s",
        "item 2 is empty",
    ),
    # launch.compile
    ("launch.compile", "--config=configs/tiny.py --topology=v5p:0x2x2", "dimension 1 is 0"),
    ("launch.compile", "--config=configs/tiny.py --topology=v9z-8", "v9z-8"),
]
COMMANDS = sorted({command for command, _, _ in CASES})


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_is_one_line_and_touches_nothing(root, command):
    cases = [
        (args.format(r=root).split(), text.format(r=root))
        for c, args, text in CASES
        if c == command
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cli_harness.py"), command, str(root)],
        input=json.dumps([args for args, _ in cases]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "LLAMA_JAX_DEBUG": ""},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = []
    for (args, text), got in zip(cases, json.loads(proc.stdout), strict=True):
        lines = [x for x in got["stderr"].splitlines() if x.startswith("error:")]
        where = f"{command} {' '.join(args)}"
        if got["code"] != 2:
            problems.append(f"{where}: exit {got['code']}\n{got['stderr'][-1500:]}")
        elif len(lines) != 1 or text not in lines[0]:
            problems.append(f"{where}: expected one error line holding {text!r}: {lines}")
        elif "Traceback" in got["stderr"]:
            problems.append(f"{where}: a traceback was printed")
        elif got["created"] or got["removed"] or got["changed"]:
            problems.append(
                f"{where}: created {got['created']}, removed {got['removed']}, "
                f"changed {got['changed']}"
            )
    assert not problems, "\n".join(problems)


def test_verbose_and_the_debug_variable_add_the_traceback(root):
    args = ["--model_dir", str(root / "afile.txt"), "--out_dir", str(root / "o")]
    for extra, env in (["--verbose"], {}), ([], {"LLAMA_JAX_DEBUG": "1"}):
        proc = subprocess.run(
            [sys.executable, "-m", "convert.orbax_to_hf", *args, *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **env},
        )
        assert proc.returncode == 2
        assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")
