"""Tokenizer tests on tiny tokenizers trained here: a SentencePiece model (LLaMA 1/2 style) and a
byte-level BPE tokenizer.json with a BOS-adding post-processor (LLaMA 3 style)."""

import json
import random
import re
import shutil

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError

BOS, EOT, EOT_ID = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
IM_END = "<|im_end|>"  # a chat fine-tune's EOS that SentencePiece treats as plain text
TEXTS = [
    "Hello world",
    "The man was here before the state.",
    "  two  spaces\nand a newline\n",
    " leading space",
    "naïve café — 東京 🦙",
    "",
]
WORDS = (
    "the a of and to in is it that for on with as was by at be this from or have an they which "
    "one you were all we her she there been if more when will would who so no out up into do than "
    "time only could new them man some these then two first may any like now my such make over our"
).split()


def write_json(path, obj):
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    lines = []
    for _ in range(800):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        lines.append(sentence.capitalize() + rng.choice(".?!,"))
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus):
    """tokenizer.model trained like LLaMA's: BPE, byte fallback, no normalization."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=320,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=True,
        user_defined_symbols=[IM_END],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, corpus):
    """tokenizer.json like LLaMA 3's: byte-level BPE, special tokens after the merges' ids, and a
    post-processor that puts BOS in front."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([BOS, EOT, EOT_ID])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
            ),
        ]
    )
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def sp_dir(tmp_path, sp_model):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    return tmp_path


@pytest.fixture
def llama3_dir(tmp_path, hf_json):
    """A LLaMA 3 instruct-like directory: tokenizer_config names one EOS (as a dict), while
    generation stops on two."""
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    raw = tokenizers.Tokenizer.from_file(str(hf_json))
    bos, end, eot = (raw.token_to_id(t) for t in (BOS, EOT, EOT_ID))
    eos_token = {"__type": "AddedToken", "content": EOT_ID, "lstrip": False, "rstrip": False}
    eos_token.update(normalized=False, single_word=False, special=True)
    write_json(
        tmp_path / "tokenizer_config.json",
        {"bos_token": BOS, "eos_token": eos_token, "tokenizer_class": "PreTrainedTokenizerFast"},
    )
    write_json(
        tmp_path / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [end, eot]}
    )
    write_json(tmp_path / "config.json", {"bos_token_id": bos, "eos_token_id": end})
    return tmp_path


@pytest.fixture(params=["sp_dir", "llama3_dir"])
def tok(request):
    return Tokenizer.from_dir(request.getfixturevalue(request.param))


@pytest.mark.parametrize("post_processor_adds_bos", [True, False])
def test_tokenizer_json_matches_transformers(llama3_dir, post_processor_adds_bos):
    transformers = pytest.importorskip("transformers")
    if not post_processor_adds_bos:  # as in tokenizers that declare a BOS but never add it
        spec = json.loads((llama3_dir / "tokenizer.json").read_text())
        spec["post_processor"] = None
        write_json(llama3_dir / "tokenizer.json", spec)
    ref = transformers.AutoTokenizer.from_pretrained(str(llama3_dir), local_files_only=True)
    tok = Tokenizer.from_dir(llama3_dir)
    assert tok.bos_id == ref.bos_token_id
    for text in [*TEXTS, f"a{EOT_ID}b"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text


def test_exactly_one_bos_although_the_post_processor_adds_one(llama3_dir):
    raw = tokenizers.Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    bos = raw.token_to_id(BOS)
    assert raw.encode("Hello world").ids[0] == bos, "the fixture should add BOS on its own"
    tok = Tokenizer.from_dir(llama3_dir)
    ids = tok.encode("Hello world", add_bos=True)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode("Hello world", add_bos=False) == ids[1:]


def test_sentencepiece_matches_sentencepiece_processor(sp_dir):
    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_dir(sp_dir)
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (1, (2,), 2, 3)
    assert tok.vocab_size == ref.get_piece_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1 and ids[1:] == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids[1:]), text


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_eos=True)) == text
        assert tok.decode(np.asarray(tok.encode(text), np.int32)) == text


def test_add_eos_appends_the_first_eos(tok):
    ids = tok.encode("Hello world", add_eos=True)
    assert ids[-1] == tok.eos_id and ids[:-1] == tok.encode("Hello world")
    assert tok.eos_id not in tok.encode("Hello world")


def test_encode_batch_equals_encode(tok):
    for kwargs in ({}, {"add_bos": False, "add_eos": True}):
        assert tok.encode_batch(TEXTS, **kwargs) == [tok.encode(t, **kwargs) for t in TEXTS]
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("Hello world")


@pytest.mark.parametrize(
    "model_dir, bos_text, eos_text", [("sp_dir", "<s>", "</s>"), ("llama3_dir", BOS, EOT)]
)
def test_decode_skip_special_tokens(request, model_dir, bos_text, eos_text):
    tok = Tokenizer.from_dir(request.getfixturevalue(model_dir))
    ids = [tok.bos_id, *tok.encode("Hello world", add_bos=False), tok.eos_id]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == f"{bos_text}Hello world{eos_text}"


def test_decode_skips_eos_ids_the_backend_treats_as_text(sp_dir):
    ref = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    im_end = ref.piece_to_id(IM_END)
    write_json(sp_dir / "generation_config.json", {"eos_token_id": [2, im_end]})
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode(f"Hello world{IM_END}")
    assert ids[-1] == im_end and ref.decode(ids).endswith(IM_END)
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == f"<s>Hello world{IM_END}"


def test_decode_batch_skips_padding(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    rows = tok.encode_batch(TEXTS[:3], add_eos=True)
    padded_BT = np.full((len(rows), max(map(len, rows))), tok.pad_id, np.int32)
    for b, row in enumerate(rows):
        padded_BT[b, : len(row)] = row
    assert tok.decode_batch(padded_BT) == TEXTS[:3]


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} "):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_special_ids_precedence(llama3_dir):
    raw = tokenizers.Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    bos, end, eot = (raw.token_to_id(t) for t in (BOS, EOT, EOT_ID))
    tok = Tokenizer.from_dir(llama3_dir)
    # generation_config.json's list wins: generation must stop on both.
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (bos, (end, eot), end, None)
    (llama3_dir / "generation_config.json").unlink()
    assert Tokenizer.from_dir(llama3_dir).eos_ids == (eot,)  # tokenizer_config's dict form
    (llama3_dir / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(llama3_dir)
    assert (tok.bos_id, tok.eos_ids) == (bos, (end,))  # config.json's ints
    assert tok.encode("Hello world")[0] == bos  # the post-processor says BOS is wanted


def test_sentencepiece_tokenizer_config(sp_dir):
    write_json(
        sp_dir / "tokenizer_config.json",
        {"bos_token": {"content": "<s>"}, "pad_token": "<unk>", "add_bos_token": False},
    )
    tok = Tokenizer.from_dir(sp_dir)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 0)  # id 0 is a valid pad
    assert tok.encode("Hello world")[0] != 1
    assert tok.encode("Hello world", add_bos=True) == [1, *tok.encode("Hello world")]


def test_from_dir_prefers_tokenizer_json(tmp_path, sp_model, hf_json):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 320
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(hf_json))
    assert tok.vocab_size == raw.get_vocab_size() != 320
    assert tok.encode("Hello world") == raw.encode("Hello world", add_special_tokens=False).ids


def test_from_file_uses_only_the_file(sp_model, hf_json):
    tok = Tokenizer.from_file(sp_model)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 3)
    tok = Tokenizer.from_file(hf_json)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (None, (), None)
    raw = tokenizers.Tokenizer.from_file(str(hf_json))
    assert tok.encode("Hello world") == raw.encode("Hello world", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("Hello world", add_bos=True)


def test_missing_tokenizer_names_the_directory_and_files(tmp_path):
    write_json(tmp_path / "config.json", {})
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_dir(tmp_path)
    for expected in (str(tmp_path), "tokenizer.json", "tokenizer.model"):
        assert expected in str(e.value)


@pytest.mark.parametrize(
    "name, content, hint",
    [
        ("tokenizer.json", b'{"version": "1.0", "model": ', "tokenizer.json"),
        ("tokenizer.model", b"\x00\x01 not a model", "SentencePiece"),
        ("tokenizer.model", b"IQ== 0\nIg== 1\n", "tiktoken"),
    ],
)
def test_corrupt_tokenizer_file_names_the_file(tmp_path, name, content, hint):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path))) as e:
        Tokenizer.from_dir(tmp_path)
    assert hint in str(e.value)


@pytest.mark.parametrize("model_dir, token", [("llama3_dir", "<s>"), ("sp_dir", BOS)])
def test_config_token_missing_from_the_vocabulary(request, model_dir, token):
    model_dir = request.getfixturevalue(model_dir)
    write_json(model_dir / "tokenizer_config.json", {"bos_token": token})
    with pytest.raises(DataError, match=rf"bos_token '{re.escape(token)}' in .*tokenizer_config"):
        Tokenizer.from_dir(model_dir)
