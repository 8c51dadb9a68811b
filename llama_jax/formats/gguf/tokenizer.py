"""Tokenizer files rebuilt from a GGUF vocabulary (`gguf_vocab.Vocab`): a SentencePiece
`tokenizer.model` for a "llama" vocabulary, a tokenizers `tokenizer.json` for a "gpt2"
one, and a `tokenizer_config.json` naming the special tokens, so `Tokenizer.from_dir`
reads the imported model's tokenizer as llama.cpp tokenizes.
"""

from __future__ import annotations

import json
import os

import gguf
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from llama_jax.errors import DataError
from llama_jax.formats.gguf.vocab import HF_MODEL, SPLITS, SPM_MODEL, TOKENIZER_CONFIG, Vocab

T = gguf.TokenType


def write_tokenizer_files(vocab: Vocab, directory: str) -> dict[str, str]:
    """Writes the tokenizer (tokenizer.model or tokenizer.json) and a tokenizer_config.json
    naming its special tokens into `directory`; returns file name -> path."""
    if vocab.model == "llama":
        name, data = SPM_MODEL, _sentencepiece_model(vocab)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    else:
        name = HF_MODEL
        _byte_level_tokenizer(vocab).save(os.path.join(directory, name))
    config: dict = {"add_bos_token": vocab.add_bos, "add_eos_token": vocab.add_eos}
    for key in ("bos", "eos", "unk", "pad"):
        if getattr(vocab, key) is not None:
            config[f"{key}_token"] = vocab.tokens[getattr(vocab, key)]
    if vocab.named_templates:
        config["chat_template"] = [
            {"name": n, "template": t} for n, t in vocab.named_templates.items()
        ] + ([{"name": "default", "template": vocab.chat_template}] if vocab.chat_template else [])
    elif vocab.chat_template is not None:
        config["chat_template"] = vocab.chat_template
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return {n: os.path.join(directory, n) for n in (name, TOKENIZER_CONFIG)}


def _sentencepiece_model(vocab: Vocab) -> bytes:
    """A SentencePiece BPE model with the vocabulary's pieces, scores and types (GGUF's
    token types are SentencePiece's piece types)."""
    proto = sentencepiece_model_pb2.ModelProto()
    for text, score, kind in zip(vocab.tokens, vocab.scores, vocab.types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    unk = (
        vocab.unk
        if vocab.unk is not None
        else next((i for i, t in enumerate(vocab.types) if t == T.UNKNOWN), None)
    )
    if unk is None or vocab.types[unk] != T.UNKNOWN:
        raise DataError("a SentencePiece vocabulary needs an unknown token; this one has none")
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab.tokens)
    spec.byte_fallback = any(t == T.BYTE for t in vocab.types)
    spec.unk_id, spec.unk_piece = unk, vocab.tokens[unk]
    # SentencePiece reports a special id only where its piece is a control token.
    for name in ("bos", "eos", "pad"):
        i = getattr(vocab, name)
        control = i is not None and vocab.types[i] == T.CONTROL
        setattr(spec, f"{name}_id", i if control else -1)
        if control:
            setattr(spec, f"{name}_piece", vocab.tokens[i])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = vocab.add_space_prefix
    norm.remove_extra_whitespaces = vocab.remove_extra_whitespaces
    norm.escape_whitespaces = True
    data = proto.SerializeToString()
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise DataError(f"the GGUF vocabulary is not a valid SentencePiece model ({e})") from e
    return data


def _byte_level_tokenizer(vocab: Vocab) -> tokenizers.Tokenizer:
    """A tokenizers BPE with the vocabulary's ids, merges and pre-tokenizer. Control and
    user-defined tokens are added tokens (matched whole in text, as llama.cpp does)."""
    ids = {}
    for i, text in enumerate(vocab.tokens):
        if text in ids:
            raise DataError(f"token {text!r} appears twice (ids {ids[text]} and {i})")
        ids[text] = i
    merges = []
    for m in vocab.merges:
        pair = tuple(m.split(" "))
        if len(pair) != 2:
            raise DataError(f"merge {m!r} is not two tokens separated by a space")
        merges.append(pair)
    try:
        tok = tokenizers.Tokenizer(
            models.BPE(vocab=ids, merges=merges, ignore_merges=vocab.pre == "llama-bpe")
        )
    except Exception as e:  # tokenizers raises a bare Exception for a bad model
        raise DataError(f"the GGUF vocabulary is not a valid BPE model ({e})") from e
    # The split patterns replace ByteLevel's own GPT-2 pattern.
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=vocab.pre not in SPLITS)
    if vocab.pre in SPLITS:
        split = pre_tokenizers.Split(Regex(SPLITS[vocab.pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, level])
    elif vocab.pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, level])
    else:
        tok.pre_tokenizer = level
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            tokenizers.AddedToken(t, normalized=False, special=False)
            for t, k in zip(vocab.tokens, vocab.types, strict=True)
            if k == T.USER_DEFINED
        ]
    )
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(t, normalized=False, special=True)
            for t, k in zip(vocab.tokens, vocab.types, strict=True)
            if k == T.CONTROL
        ]
    )
    if vocab.add_bos and vocab.bos is not None:
        bos = vocab.tokens[vocab.bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab.bos)],
        )
    return tok
