"""Evaluation with a model: perplexity against transformers, multiple-choice
log-likelihoods and accuracy, generation, and `launch.evaluate`."""

import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_models import make_hf_model

from llama_jax import sharding
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.evals import evaluate, perplexity, tasks
from llama_jax.formats import ModelDir, model_dir
from llama_jax.nn import losses

SPECIALS = ["<pad>", "<s>", "</s>"]
ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("owl", "hoot")]
DOCS = [
    "A short one.",
    "A document that is longer than two windows of twenty-four bytes, so it is split.",
    "Mid-sized text of some thirty bytes.",
    "x",
]


def _write_byte_tokenizer(directory):
    """One token per byte (ids 3..258) after <pad>, <s>, </s>: fits the 263-token models."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}
        )
    )
    return Tokenizer.from_dir(directory)


def _write_task(path, spec, examples):
    lines = [{"task": spec}, *examples]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def mesh():
    return sharding.create_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def hf(tmp_path_factory, mesh):
    """A random transformers model (V=263) with the byte tokenizer, loaded on a 2x2x2 mesh."""
    directory = tmp_path_factory.mktemp("hf")
    torch_model = make_hf_model(directory, vocab_size=263, num_key_value_heads=1)
    tokenizer = _write_byte_tokenizer(directory)
    model, _ = model_dir.load_model(directory, mesh=mesh)
    return torch_model, model, tokenizer, directory


def _torch_log_probs(torch_model, ids):
    """float64 [len(ids), V] log-softmax of the transformers model over one sequence."""
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_per_document_perplexity_on_a_mesh_matches_transformers(hf, tmp_path):
    torch_model, model, tokenizer, _ = hf
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(DOCS) + "\n")
    seq_len = 24
    docs = perplexity.read_documents(text, split="blank_lines")
    assert docs == DOCS
    got = perplexity.eval_perplexity(
        model, tokenizer, docs, seq_len=seq_len, batch_size=8, add_bos=True, add_eos=True
    )
    # Each document is BOS + bytes + EOS, scored alone in disjoint spans of 24 predictions,
    # each from the 24 tokens before its last one.
    total, tokens = 0.0, 0
    for doc in DOCS:
        ids = tokenizer.encode(doc, add_bos=True, add_eos=True)
        for first in range(1, len(ids), seq_len):
            last = min(first + seq_len, len(ids)) - 1
            start = max(0, last - seq_len)
            logp = _torch_log_probs(torch_model, ids[start:last])
            total -= sum(logp[p - 1 - start, ids[p]] for p in range(first, last + 1))
            tokens += last + 1 - first
    assert got["tokens"] == tokens == sum(len(d) + 1 for d in DOCS)
    assert got["documents"] == len(DOCS)
    assert got["loss"] == pytest.approx(total / tokens, rel=2e-5)
    assert got["perplexity"] == math.exp(got["loss"])


def test_choice_log_likelihoods_match_transformers_on_a_mesh(hf, tmp_path):
    torch_model, model, tokenizer, _ = hf
    spec = {
        "type": "multiple_choice",
        "prompt": "Q: {q}\nA: ",  # the trailing space moves to the choices
        "target": "{choice}",
        "choices": "options",
    }
    examples = [
        {"q": "one", "options": ["x", "yes"], "answer": 0},
        {"q": "a much longer question " * 4, "options": ["y", "z", "w"], "answer": 2},
    ]
    task = tasks.load_task(_write_task(tmp_path / "t.jsonl", spec, examples))
    got = evaluate.eval_task(
        model, tokenizer, task, max_len=128, batch_size=8, details=True, loss_chunk=3
    )
    for ex, row in zip(examples, got["examples"], strict=True):
        context = f"Q: {ex['q']}\nA:"
        ctx = tokenizer.encode(context)
        want = []
        for choice in ex["options"]:
            whole = tokenizer.encode(context + " " + choice)
            assert whole[: len(ctx)] == ctx
            logp = _torch_log_probs(torch_model, whole[:-1])
            positions = np.arange(len(ctx) - 1, len(whole) - 1)
            want.append(logp[positions, whole[len(ctx) :]].sum())
        np.testing.assert_allclose(row["log_likelihoods"], want, rtol=1e-4)
        assert row["pred"] == int(np.argmax(want))
        chars = [len(" " + c) for c in ex["options"]]  # the moved space counts
        assert row["pred_norm"] == int(np.argmax(np.asarray(want) / chars))
    acc = np.mean(
        [r["pred"] == ex["answer"] for r, ex in zip(got["examples"], examples, strict=True)]
    )
    assert got["metrics"]["acc"] == acc and got["n"] == 2

    # With max_len 16 the long prompt loses its start (the model sees the last 16 tokens
    # before the final one); the short one fits and scores as before.
    short = evaluate.eval_task(
        model, tokenizer, task, max_len=16, batch_size=8, details=True, loss_chunk=3
    )
    np.testing.assert_allclose(
        short["examples"][0]["log_likelihoods"], got["examples"][0]["log_likelihoods"], rtol=1e-5
    )
    want = []
    for choice in examples[1]["options"]:
        seq = tokenizer.encode(f"Q: {examples[1]['q']}\nA: {choice}")[-17:]
        want.append(_torch_log_probs(torch_model, seq[:-1])[-2:][[0, 1], seq[-2:]].sum())
    np.testing.assert_allclose(short["examples"][1]["log_likelihoods"], want, rtol=1e-4)


@pytest.fixture(scope="module")
def trained(hf):
    """The random model trained until it knows which sound each animal makes."""
    _, _, tokenizer, directory = hf
    # Loading beats a fresh init here: random initialisers compile slowly on the CPU.
    model, _ = model_dir.load_model(directory)
    ids = tokenizer.encode_batch([f"{a} says: {s}\n" for a, s in ANIMALS], add_eos=True)
    t = max(map(len, ids))
    tokens = np.zeros((len(ids), t), np.int32)
    segments = np.zeros_like(tokens)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
        segments[i, : len(row)] = 1
    mask = segments * np.roll(segments, -1, axis=1)
    mask[:, -1] = 0
    batch = dict(
        tokens=tokens, segment_ids=segments, targets=np.roll(tokens, -1, axis=1), loss_mask=mask
    )
    graphdef, state = nnx.split(model)
    # Plain single-device arrays in and out, so the step compiles once.
    device = jax.devices()[0]
    params = jax.device_put(nnx.to_pure_dict(state), device)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            total, count = losses.token_loss_sum(nnx.merge(graphdef, p), batch, 64)
            return total / count

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = jax.device_put(tx.init(params), device)
    for _ in range(60):
        params, opt_state, _ = step(params, opt_state)
    return nnx.merge(graphdef, params), tokenizer


def test_trained_preference_is_picked_and_generated(trained, tmp_path):
    model, tokenizer = trained
    sounds = [s for _, s in ANIMALS]
    examples = [{"animal": a, "sound": s} for a, s in ANIMALS]
    mc = tasks.load_task(
        _write_task(
            tmp_path / "mc.jsonl",
            {
                "type": "multiple_choice",
                "prompt": "{animal} says:",
                "choices": sounds,
                "answer": "sound",
            },
            examples,
        )
    )
    got = evaluate.eval_task(model, tokenizer, mc, max_len=32, batch_size=4, details=True)
    assert got["metrics"]["acc"] == 1.0 and got["metrics"]["acc_norm"] == 1.0
    assert got["metrics"]["acc_stderr"] == 0.0
    # Summed log-probabilities of each choice's bytes from a plain forward pass over
    # right-padded rows (causal: the padding cannot change earlier positions).
    pairs = [
        (tokenizer.encode(f"{a} says:"), tokenizer.encode(f"{a} says: {c}"))
        for a, _ in ANIMALS
        for c in sounds
    ]
    rows = np.zeros((len(pairs), max(len(w) for _, w in pairs)), np.int32)
    for i, (_, whole) in enumerate(pairs):
        rows[i, : len(whole)] = whole
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(rows)), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [
        logp[i, np.arange(len(ctx) - 1, len(whole) - 1), whole[len(ctx) :]].sum()
        for i, (ctx, whole) in enumerate(pairs)
    ]
    lls = [x for row in got["examples"] for x in row["log_likelihoods"]]
    np.testing.assert_allclose(lls, want, rtol=1e-4, atol=1e-5)
    for (_, sound), row in zip(ANIMALS, got["examples"], strict=True):
        assert sounds[row["pred"]] == sound and row["greedy"][row["answer"]]

    gen_spec = {
        "type": "generate",
        "prompt": "{animal} says:",
        "reference": "sound",
        "stop": ["\n"],
        "max_new_tokens": 8,
    }
    gen = tasks.load_task(_write_task(tmp_path / "gen.jsonl", gen_spec, examples))
    got = evaluate.eval_task(model, tokenizer, gen, max_len=32, batch_size=2, details=True)
    assert [r["prediction"] for r in got["examples"]] == [f" {s}" for s in sounds]
    metrics = got["metrics"]
    assert metrics["exact_match"] == 1.0 and metrics["rougeL"] == metrics["rougeLsum"] == 1.0
    assert metrics["rouge1"] == 1.0 and metrics["rouge2_stderr"] == 0.0
    # The task's own metrics, with options, against upper-case references.
    metrics = [
        {"metric": "exact_match", "ignore_case": True},
        "chrf",
        {"metric": "chrf++", "lowercase": True},
        "bleu",
    ]
    shout = tasks.load_task(
        _write_task(
            tmp_path / "shout.jsonl",
            {**gen_spec, "metrics": metrics},
            [{**ex, "sound": ex["sound"].upper()} for ex in examples],
        )
    )
    got = evaluate.eval_task(model, tokenizer, shout, max_len=32, batch_size=2, details=True)
    assert sorted(got["metrics"]) == sorted(
        [m for name in ("exact_match", "chrf", "chrf++", "bleu") for m in (name, f"{name}_stderr")]
    )
    assert got["metrics"]["exact_match"] == 1.0 and got["metrics"]["chrf++"] == 100.0
    assert got["metrics"]["chrf"] == 0.0  # case-sensitive: no character matches
    # One-word answers have no 4-grams, and corpus BLEU without them is 0 (as sacreBLEU).
    assert got["metrics"]["bleu"] == 0.0
    assert [r["chrf++"] for r in got["examples"]] == [100.0] * len(examples)


MC = {"type": "multiple_choice", "prompt": "{q}"}
GOOD = {"q": "a", "choices": ["x", "y"], "answer": 1}


def _cli(monkeypatch, *args):
    from absl import flags

    from launch import common
    from launch import evaluate as cli

    monkeypatch.setattr(common, "init_distributed", lambda: None)
    monkeypatch.setattr(common, "quiet_logs", lambda: None)
    monkeypatch.setattr(sys, "argv", ["evaluate", *args])
    flags.FLAGS.unparse_flags()
    # Through the command's error boundary, as `python -m launch.evaluate` runs it.
    try:
        common.run(cli.main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def _no_weights(*args, **kwargs):
    raise AssertionError("the weights were read before the inputs were checked")


def test_command_prints_one_json_line_and_names_bad_input(hf, tmp_path, capsys, monkeypatch):
    _, model, tokenizer, directory = hf
    text = tmp_path / "eval.txt"
    whole = "\n\n".join(DOCS) + "\n"
    text.write_text(whole)
    out = tmp_path / "out.jsonl"
    common = [f"--model_dir={directory}", "--dtype=float32", "--mesh=data=2,fsdp=2,tensor=2"]
    _cli(monkeypatch, *common, f"--data={text}", "--seq_len=24", f"--output={out}")
    captured = capsys.readouterr()
    lines = captured.out.strip().split("\n")
    assert len(lines) == 1
    # Progress goes to stderr, ending with a line for the last row.
    assert re.search(r"^perplexity rows: (\d+)/\1 \(", captured.err, re.M)
    result = json.loads(lines[0])
    # The whole file is one document; this tokenizer adds BOS and no EOS by default.
    want = perplexity.eval_perplexity(model, tokenizer, [whole], seq_len=24, batch_size=8)
    assert result["tokens"] == want["tokens"] == len(whole.encode())
    assert result["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
    assert result["model"] == str(directory) and result["split"] == "none"
    assert result["documents"] == 1 and result["add_bos"] and not result["add_eos"]
    assert result["method"].startswith("the whole file as one document; tokenized with BOS")
    assert json.loads(out.read_text()) == result

    # Documents at blank lines, and strided windows, on request.
    _cli(monkeypatch, *common, f"--data={text}", "--seq_len=24", "--split=blank_lines")
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == len(DOCS) and result["split"] == "blank_lines"
    assert result["tokens"] == sum(len(d) for d in DOCS)
    _cli(monkeypatch, *common, f"--data={text}", "--seq_len=24", "--stride=8")
    result = json.loads(capsys.readouterr().out)
    assert result["stride"] == 8 and "every 8 tokens" in result["method"]

    task = _write_task(tmp_path / "t.jsonl", MC, [GOOD, {"q": "b", "choices": ["x"], "answer": 0}])
    _cli(monkeypatch, *common, f"--tasks={task}", "--seq_len=24", "--num_fewshot=1")
    (line,) = capsys.readouterr().out.strip().split("\n")
    result = json.loads(line)
    assert result["task"] == "t" and result["num_fewshot"] == 1 and result["n"] == 2
    assert 0.0 <= result["metrics"]["acc"] <= 1.0

    # Bad input is named before the weights are read (a broken directory would fail).
    monkeypatch.setattr(ModelDir, "load", _no_weights)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    long_answer = {"type": "generate", "prompt": "{q}", "max_new_tokens": 24}
    for content, args, message in [
        ([{"task": {**MC, "prompt": "{question}"}}, GOOD], ["--tasks"], "t.jsonl:2: the prompt"),
        ([{"task": MC}, "{oops"], ["--tasks"], "t.jsonl:2: not a valid JSON line"),
        ([], ["--data"], "bad.jsonl:2: expected a JSON object with a string 'text'"),
        ([], ["--data", "--split=blank_lines"], "split='blank_lines' applies to text files"),
        (
            [{"task": MC}, GOOD],
            ["--tasks", "--seq_len=257"],
            "seq_len=257; expected an integer from 2 to the model's max_position_embeddings (256)",
        ),
        (
            [{"task": MC}, GOOD],
            ["--tasks", "--seq_len=24", "--stride=24"],
            "stride=24; expected an integer from 1 to seq_len - 1 = 23",
        ),
        (
            [{"task": long_answer}, {"q": "a", "answer": "b"}],
            ["--tasks", "--seq_len=24"],
            "max_new_tokens=24 leaves no room for the prompt in seq_len=24",
        ),
        (
            [{"task": MC}, GOOD],
            ["--tasks", "--batch_size=6"],
            "batch_size=6; expected a positive multiple of the 4 batch shards",
        ),
    ]:
        task.write_text(
            "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in content)
        )
        path = task if args[0] == "--tasks" else bad_data
        with pytest.raises(SystemExit) as exit_info:
            _cli(monkeypatch, *common, f"{args[0]}={path}", *args[1:])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (message, err)

    # An --output or --report that cannot be written is found before the model is read.
    for flag in ["--output=/no/such/x.jsonl", "--report=/no/such/compare"]:
        with pytest.raises(SystemExit) as exit_info:
            _cli(monkeypatch, f"--model_dir={tmp_path}", f"--data={text}", flag)
        assert exit_info.value.code == 2
        assert "directory /no/such does not exist" in capsys.readouterr().err


def test_several_models_make_one_table(hf, tmp_path, capsys, monkeypatch):
    torch_model, _, _, teacher = hf
    student = tmp_path / "student"
    small = make_hf_model(
        student, seed=1, vocab_size=263, num_key_value_heads=1, num_hidden_layers=2
    )
    _write_byte_tokenizer(student)
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(DOCS) + "\n")
    mc = _write_task(
        tmp_path / "mc.jsonl", MC, [GOOD, {"q": "b", "choices": ["x", "z"], "answer": 0}]
    )
    # Each model is freed before the next is read.
    loaded = []
    real_load = ModelDir.load

    def load(self, **kwargs):
        for earlier in loaded:
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(nnx.state(earlier)))
        model = real_load(self, **kwargs)
        loaded.append(model)
        return model

    monkeypatch.setattr(ModelDir, "load", load)
    prefix = tmp_path / "compare"
    _cli(
        monkeypatch,
        f"--model_dir={teacher},{student}",
        "--dtype=float32",
        "--mesh=data=2,fsdp=2,tensor=2",
        f"--data={text}",
        f"--tasks={mc}",
        "--seq_len=32",
        f"--report={prefix}",
    )
    assert len(loaded) == 2
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(nnx.state(loaded[1])))
    out = capsys.readouterr().out
    head, table = out.split("\n\n")
    results = [json.loads(line) for line in head.split("\n")]
    assert [(r["model"], r.get("task")) for r in results] == [
        (str(m), t) for m in (teacher, student) for t in (None, "mc")
    ]
    rows = [json.loads(line) for line in (tmp_path / "compare.jsonl").read_text().splitlines()]
    assert list(rows[0]) == [
        "model",
        "perplexity",
        "bits_per_byte",
        "mc/acc",
        "mc/acc_norm",
        "parameters",
        "bytes_on_disk",
    ]
    for row, torch_ref, directory in zip(
        rows, [torch_model, small], [teacher, student], strict=True
    ):
        ppl, mc_result = [r for r in results if r["model"] == str(directory)]
        assert row["model"] == str(directory) and row["perplexity"] == ppl["perplexity"]
        assert row["bits_per_byte"] == ppl["bits_per_byte"]
        assert row["mc/acc"] == mc_result["metrics"]["acc"]
        assert row["mc/acc_norm"] == mc_result["metrics"]["acc_norm"]
        assert row["parameters"] == torch_ref.num_parameters()
        on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        assert row["bytes_on_disk"] == on_disk
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    assert rows[0]["parameters"] > rows[1]["parameters"]
    markdown = (tmp_path / "compare.md").read_text()
    assert table == markdown
    lines = markdown.splitlines()
    assert lines[0].startswith("| model | perplexity | bits_per_byte | mc/acc |")
    assert len(lines) == 4 and lines[2].startswith(f"| {teacher} | {rows[0]['perplexity']:.4f} |")
    png = (tmp_path / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_report_without_matplotlib_is_refused_before_any_model(hf, tmp_path, capsys, monkeypatch):
    _, _, _, directory = hf
    text = tmp_path / "eval.txt"
    text.write_text("some text\n")
    monkeypatch.setattr(ModelDir, "load", _no_weights)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = [f"--model_dir={directory}", f"--data={text}", f"--report={tmp_path / 'r'}"]
    with pytest.raises(SystemExit) as exit_info:
        _cli(monkeypatch, *args)
    assert exit_info.value.code == 2
    assert "the PNG chart needs matplotlib" in capsys.readouterr().err
    # The other formats need no matplotlib; a bad format is named.
    from llama_jax.evals import compare

    compare.check_report(str(tmp_path / "r"), ["jsonl", "md"])
    with pytest.raises(ValueError, match=r"report formats \['pdf'\]"):
        compare.check_report(str(tmp_path / "r"), ["pdf"])


def test_a_training_runs_size_is_its_stored_parameters():
    from llama_jax.evals import compare

    run = pathlib.Path(__file__).parent / "data" / "run_before_redesign"
    facts = compare.model_facts(run)
    config = ModelDir.open(run).config
    assert facts["parameters"] == config.num_params()
    # float32 parameters; the checkpoint's optimizer state is left out.
    assert facts["bytes_on_disk"] == 4 * config.num_params()
    checkpoint = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    assert checkpoint > 2 * facts["bytes_on_disk"]
