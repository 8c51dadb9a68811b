"""Perplexity of a real text against transformers (one window, strided windows) and
lm-evaluation-harness's rolling windows, with a tokenizer that adds BOS and one that does
not; bits per byte and word perplexity; reading text and JSONL files."""

import json
import math
import re

import numpy as np
import pytest
import torch
import transformers
from hf_models import make_hf_model

from llama_jax.errors import DataError
from llama_jax.evals import perplexity
from llama_jax.formats import model_dir

# A real text: line breaks, punctuation, digits and a few non-ASCII letters.
TEXT = """The lighthouse keeper's log for the winter of 1887 survives in a damp leather
binding. Most entries are short: the hour the lamp was lit, the wind, the number of ships
seen before dawn. On 14 January he wrote that the fog had not lifted for three days, that
the bell had been rung every two minutes through the night, and that his hands ached from
the cold.

A month later the tone changes. A schooner, the Mary Ellen, ran aground on the northern
reef; the keeper and his son rowed out twice before the tide turned, and brought back
seven sailors. He records their names with care, spelling one of them twice, as if unsure:
Søren, Soren. The cargo, barrels of salted cod and a crate of oranges, washed ashore for a
week afterwards.

By spring the entries grow longer again. He notes the return of the terns, the price of
lamp oil (up by a third since autumn), and a letter from the lighthouse board asking why
his consumption of wicks was so high. His reply is copied into the log in full. It is
polite, exact, and faintly furious: a wick lasts as long as the weather allows, and the
weather, he observes, has not been consulted.
"""


def _write_tokenizer(directory, adds_bos: bool):
    """A byte-level BPE tokenizer trained on TEXT (300 ids); its tokenizer.json adds BOS
    by itself or not, as real ones differ."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


@pytest.fixture(scope="module", params=[True, False], ids=["adds_bos", "no_bos"])
def setup(request, tmp_path_factory):
    """(transformers model, its tokenizer, our model, our tokenizer, token ids of TEXT as
    transformers makes them)."""
    directory = tmp_path_factory.mktemp("ppl")
    torch_model = make_hf_model(directory, vocab_size=300, max_position_embeddings=1024)
    _write_tokenizer(directory, request.param)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ids = hf_tokenizer(TEXT).input_ids
    assert (ids[0] == 1) == request.param
    model, _ = model_dir.load_model(directory)
    tokenizer = model_dir.load_tokenizer(directory)
    return torch_model, model, tokenizer, ids


def _log_probs(torch_model, ids):
    """float64 [len(ids), V] log-softmax of the transformers model over one sequence."""
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def _hf_strided(torch_model, ids, max_length, stride):
    """(summed NLL, predicted tokens, windows) by Hugging Face's "Perplexity of fixed-length
    models" recipe: windows of max_length tokens every stride tokens, each scoring the labels not
    scored before (never a window's first), with -log p summed rather than averaged."""
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        first = max(len(window) - (end - prev_end), 1)
        logp = _log_probs(torch_model, window[:-1])
        nll -= sum(logp[j - 1, window[j]] for j in range(first, len(window)))
        count += len(window) - first
        prev_end = end
        windows += 1
        if end == len(ids):
            break
    return nll, count, windows


def _lm_eval_rolling(torch_model, ids, max_length):
    """(summed NLL, predicted tokens, windows) with lm-evaluation-harness's rolling windows
    (context_len 1) over ids[1:], ids[0] as the prefix token, written from its description:
    the first window predicts its first max_length tokens, each later one the next
    max_length (fewer at the end) from the max_length tokens before the last of them."""
    tokens, prefix = ids[1:], ids[0]
    first = min(max_length, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        windows.append((tokens[max(end - max_length - 1, 0) : end - 1], tokens[end - n : end]))
        done = end
    nll, count = 0.0, 0
    for inputs, targets in windows:
        logp = _log_probs(torch_model, inputs)
        rows = np.arange(len(inputs) - len(targets), len(inputs))
        nll -= logp[rows, targets].sum()
        count += len(targets)
    return nll, count, len(windows)


def test_one_window_equals_transformers(setup):
    torch_model, model, tokenizer, ids = setup
    assert tokenizer.encode(TEXT) == ids
    with torch.no_grad():
        loss = torch_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    got = perplexity.eval_perplexity(model, tokenizer, [TEXT], seq_len=1024, batch_size=1)
    assert got["windows"] == 1 and got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=5e-3)  # the promise
    assert got["loss"] == pytest.approx(loss, rel=1e-4)  # and the float32 reality
    assert got["add_bos"] == (ids[0] == 1) and got["add_eos"] is False
    # lm-evaluation-harness's tokenizer-independent figures.
    nll = got["loss"] * got["tokens"]
    assert got["bytes"] == len(TEXT.encode("utf-8")) > len(TEXT)  # non-ASCII letters
    assert got["words"] == len(re.split(r"\s+", TEXT))
    assert got["bits_per_byte"] == pytest.approx(nll / got["bytes"] / math.log(2), rel=1e-12)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / got["bytes"]), rel=1e-12)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / got["words"]), rel=1e-12)


def test_strided_and_disjoint_windows(setup):
    torch_model, model, tokenizer, ids = setup
    seq_len, stride = 64, 24
    got = perplexity.eval_perplexity(
        model, tokenizer, [TEXT], seq_len=seq_len, stride=stride, batch_size=4
    )
    # Hugging Face's recipe with max_length = seq_len: the same windows and tokens.
    nll, count, windows = _hf_strided(torch_model, ids, seq_len, stride)
    assert got["tokens"] == count == len(ids) - 1
    assert got["windows"] == windows > 20 and got["stride"] == stride
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=5e-3)  # the promise
    assert got["loss"] == pytest.approx(nll / count, rel=1e-4)

    # Without a stride the windows are disjoint: lm-evaluation-harness's rolling windows.
    disjoint = perplexity.eval_perplexity(model, tokenizer, [TEXT], seq_len=seq_len, batch_size=4)
    nll, count, windows = _lm_eval_rolling(torch_model, ids, seq_len)
    assert disjoint["tokens"] == count == len(ids) - 1
    assert disjoint["windows"] == windows == math.ceil(count / seq_len)
    assert disjoint["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert disjoint["stride"] is None and disjoint["loss"] != got["loss"]
    line = perplexity.describe(disjoint, "none")
    assert "whole file as one document" in line and f"disjoint windows of {seq_len}" in line
    assert ("with BOS" if ids[0] == 1 else "without BOS") in line and "no EOS" in line
    assert f"every {stride} tokens" in perplexity.describe(got, "none")


def test_documents_are_scored_separately_and_packing_changes_nothing(setup):
    _, model, tokenizer, _ = setup
    docs = re.split(r"(?<=[.:;])\s+", TEXT.strip())  # sentences
    assert len(docs) == 15
    for kw in (dict(seq_len=64), dict(seq_len=32, stride=12)):
        packed = perplexity.eval_perplexity(model, tokenizer, docs, batch_size=4, **kw)
        alone = perplexity.eval_perplexity(model, tokenizer, docs, batch_size=4, pack=False, **kw)
        parts = [
            perplexity.eval_perplexity(model, tokenizer, [d], batch_size=4, **kw) for d in docs
        ]
        assert packed["documents"] == len(docs) and packed["windows"] == alone["rows"]
        assert packed["tokens"] == sum(p["tokens"] for p in parts)
        total = sum(p["loss"] * p["tokens"] for p in parts)
        assert packed["loss"] * packed["tokens"] == pytest.approx(total, rel=1e-5)
        assert alone["loss"] == pytest.approx(packed["loss"], rel=1e-5)
    assert packed["rows"] == alone["rows"]  # stride windows fill their rows
    short = perplexity.eval_perplexity(model, tokenizer, docs, seq_len=64, batch_size=4)
    assert short["rows"] < short["windows"]  # several short documents share a row
    # BOS and EOS on every document on request (the former per-document default).
    both = perplexity.eval_perplexity(
        model, tokenizer, docs, seq_len=64, batch_size=4, add_bos=True, add_eos=True
    )
    plain = [len(tokenizer.encode(d, add_bos=False)) for d in docs]
    assert both["tokens"] == sum(n + 1 for n in plain)
    with pytest.raises(DataError, match=r"stride=48; expected an integer from 1 to seq_len - 1"):
        perplexity.eval_perplexity(model, tokenizer, docs, seq_len=48, stride=48, batch_size=1)
    with pytest.raises(DataError, match=r"seq_len=1025; .*max_position_embeddings \(1024\)"):
        perplexity.eval_perplexity(model, tokenizer, docs, seq_len=1025, batch_size=1)


def test_reading_text_and_jsonl(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.replace("\n", "\r\n").encode("utf-8"))
    assert perplexity.read_documents(path) == [TEXT]  # as open(path).read() gives it
    blocks = perplexity.read_documents(path, split="blank_lines")
    assert blocks == [b.strip("\n") for b in TEXT.split("\n\n")]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"body": b}) + "\n" for b in blocks))
    assert perplexity.read_documents(jsonl, field="body") == blocks
    for kwargs, message in [
        (dict(path=jsonl, split="blank_lines"), "applies to text files"),
        (dict(path=path, split="lines"), r"split='lines' is unknown"),
        (dict(path=tmp_path / "none.txt"), "does not exist"),
    ]:
        with pytest.raises(DataError, match=message):
            perplexity.read_documents(**kwargs)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="holds no text"):
        perplexity.read_documents(empty)
