"""Tokenizers in GGUF: a model's tokenizer files as llama.cpp's vocabulary metadata
(`read_vocab`, `write_vocab`), and that metadata read back (`vocab_from_metadata`;
`gguf_tokenizer` rebuilds tokenizer files from it).

llama.cpp knows two kinds of vocabulary for LLaMA models:

- "llama": SentencePiece BPE (LLaMA 1/2), every piece with its score and type. Read
  from `tokenizer.model`; a SentencePiece-style `tokenizer.json` (Metaspace, as
  transformers converts one) is expressed the same way, each token scored by the rank
  of the merge that makes it. Imported as a `tokenizer.model`.
- "gpt2": byte-level BPE (LLaMA 3, SmolLM) with its merges, plus the name of the
  pre-tokenizer splitting text before the merges (`tokenizer.ggml.pre`, e.g.
  "llama-bpe"): llama.cpp has each pre-tokenizer built in, so only the ones in
  PRE_TOKENIZERS can be expressed. Imported as a `tokenizer.json`.

The vocabulary has exactly one token per embedding row: ids the tokenizer leaves
unused are filled with "[PAD<id>]" tokens of type UNUSED, as llama.cpp's converter does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gguf
from absl import logging
from sentencepiece import sentencepiece_model_pb2

from llama_jax.config import LlamaConfig
from llama_jax.data import Tokenizer
from llama_jax.errors import DataError

T = gguf.TokenType
K = gguf.Keys.Tokenizer
SPM_MODEL = "tokenizer.model"
HF_MODEL = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Pre-tokenizer split patterns of byte-level BPE vocabularies (as their tokenizer.json
# files write them), by the name llama.cpp gives the pre-tokenizer.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# Every pre-tokenizer this module writes and reads, and the other names llama.cpp gives
# the LLaMA 3 one.
PRE_TOKENIZERS = ("llama-bpe", "qwen2", "gpt-2", "smollm")
_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}


@dataclasses.dataclass
class Vocab:
    """A vocabulary as GGUF holds it. Ids are positions in `tokens`; special ids are
    None when unset."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None = None  # "llama" only
    merges: list[str] | None = None  # "gpt2" only: "left right"
    pre: str | None = None  # "gpt2" only: one of PRE_TOKENIZERS
    bos: int | None = None
    eos: int | None = None
    eot: int | None = None
    eom: int | None = None
    unk: int | None = None
    pad: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True  # "llama" only
    remove_extra_whitespaces: bool = False  # "llama" only
    chat_template: str | None = None
    named_templates: dict[str, str] = dataclasses.field(default_factory=dict)


# --- tokenizer files -> Vocab -----------------------------------------------------------


def read_vocab(source, config: LlamaConfig) -> Vocab:
    """The vocabulary of a tokenizer directory or file, padded to config.vocab_size.

    A directory with tokenizer.model uses it (SentencePiece, with tokenizer.json's
    added tokens past its pieces), else its tokenizer.json. Special ids follow the
    tokenizer's own resolution (`Tokenizer.from_dir` / `from_file`), then the config's.
    Raises DataError for a tokenizer GGUF cannot express."""
    source = os.fspath(source)
    is_dir = os.path.isdir(source)
    directory = source if is_dir else os.path.dirname(source)
    spm = os.path.join(source, SPM_MODEL) if is_dir else source
    hf = os.path.join(source, HF_MODEL) if is_dir else source
    if spm.endswith(".model") and os.path.isfile(spm):
        added = _hf_json(hf)["added_tokens"] if is_dir and os.path.isfile(hf) else []
        vocab = _from_sentencepiece(spm, added)
    elif hf.endswith(".json") and os.path.isfile(hf):
        vocab = _from_tokenizer_json(hf)
    else:
        raise DataError(f"{source}: no {SPM_MODEL} or {HF_MODEL} to put in the GGUF file")
    _pad_to(vocab, config.vocab_size, source)
    _check_bytes(vocab, source)
    tok = Tokenizer.from_dir(directory) if is_dir else Tokenizer.from_file(source)
    eos_ids = list(tok.eos_ids or config.eos_token_ids)
    vocab.bos = _first(tok.bos_id, config.bos_token_id)
    vocab.eos = eos_ids[0] if eos_ids else None
    vocab.pad = _first(tok.pad_id, config.pad_token_id)
    for i in [*eos_ids, *config.eos_token_ids]:
        text = vocab.tokens[i] if 0 <= i < len(vocab.tokens) else None
        if text == "<|eot_id|>":
            vocab.eot = i
        elif text == "<|eom_id|>":
            vocab.eom = i
    vocab.add_bos = bool(tok.encode("", add_bos=None))
    tok_config = _json_object(os.path.join(directory, TOKENIZER_CONFIG)) if is_dir else {}
    vocab.add_eos = bool(tok_config.get("add_eos_token", False))
    _read_templates(vocab, tok_config, directory if is_dir else None)
    for name in ("bos", "eos", "eot", "eom", "unk", "pad"):
        value = getattr(vocab, name)
        if value is not None and not 0 <= value < len(vocab.tokens):
            raise DataError(
                f"{source}: the {name} token id {value} is outside the vocabulary "
                f"[0, {len(vocab.tokens)})"
            )
    return vocab


def _first(*values):
    return next((v for v in values if v is not None), None)


def _json_object(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _hf_json(path: str) -> dict:
    data = _json_object(path)
    data.setdefault("added_tokens", [])
    if not isinstance(data.get("model"), dict):
        raise DataError(f"{path} has no 'model' object; expected a tokenizers JSON file")
    return data


def _read_templates(vocab: Vocab, tok_config: dict, directory: str | None) -> None:
    template = tok_config.get("chat_template")
    if directory is not None and os.path.isfile(os.path.join(directory, CHAT_TEMPLATE_FILE)):
        with open(os.path.join(directory, CHAT_TEMPLATE_FILE), encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):
        for entry in template:
            if entry.get("name") == "default":
                vocab.chat_template = entry.get("template")
            elif entry.get("name"):
                vocab.named_templates[entry["name"]] = entry.get("template", "")
    elif isinstance(template, str):
        vocab.chat_template = template


def _from_sentencepiece(path: str, added: list[dict]) -> Vocab:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf raises its own DecodeError
        raise DataError(f"{path} is not a SentencePiece model ({e})") from e
    bpe = sentencepiece_model_pb2.TrainerSpec.BPE
    if proto.trainer_spec.model_type != bpe:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise DataError(
            f"{path} is a SentencePiece {kind} model; llama.cpp's LLaMA vocabulary "
            "tokenizes as SentencePiece BPE, so only BPE models can be expressed"
        )
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        logging.warning(
            "%s normalizes text (%s) before tokenizing; llama.cpp does not, so text that "
            "normalization changes (newlines, tabs, full-width characters) tokenizes "
            "differently there. LLaMA's own tokenizer uses normalization_rule_name='identity'.",
            path,
            norm.name,
        )
    vocab = Vocab(
        model="llama",
        tokens=[p.piece for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
        remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces,
    )
    unk = [i for i, t in enumerate(vocab.types) if t == T.UNKNOWN]
    vocab.unk = unk[0] if unk else None
    for entry in added:
        i = entry["id"]
        if i < len(vocab.tokens):
            continue
        _pad_to(vocab, i, path)
        vocab.tokens.append(entry["content"])
        vocab.types.append(T.CONTROL if entry.get("special") else T.USER_DEFINED)
        vocab.scores.append(-1000.0)
    return vocab


def _merge_pairs(model: dict, path: str) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise DataError(f"{path}: merge {m!r} has a space inside a token; GGUF cannot hold it")
        pairs.append(pair)
    return pairs


def _from_tokenizer_json(path: str) -> Vocab:
    data = _hf_json(path)
    model = data["model"]
    if model.get("type") != "BPE":
        raise DataError(
            f"{path}: a {model.get('type')} tokenizer; GGUF's LLaMA vocabularies are BPE "
            "(byte-level, or SentencePiece-style)"
        )
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in data["added_tokens"]}
    size = max([*by_id, *added], default=-1) + 1
    pairs = _merge_pairs(model, path)
    pre, space_prefix = _classify(data, path)
    if pre is not None:
        vocab = Vocab(model="gpt2", tokens=[], types=[], pre=pre)
        vocab.merges = [f"{a} {b}" for a, b in pairs]
    else:
        # Scored by merge rank: SentencePiece merges the highest-scored pair first.
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(pairs):
            rank.setdefault(a + b, r)
        vocab = Vocab(model="llama", tokens=[], types=[], scores=[])
        vocab.add_space_prefix = space_prefix
    byte_fallback = bool(model.get("byte_fallback"))
    unk_text = model.get("unk_token")
    for i in range(size):
        if i in added:
            text = added[i]["content"]
            kind = T.CONTROL if added[i].get("special") else T.USER_DEFINED
        elif i in by_id:
            text, kind = by_id[i], T.NORMAL
        else:
            text, kind = f"[PAD{i}]", T.UNUSED
        if text == unk_text and vocab.model == "llama":
            kind, vocab.unk = T.UNKNOWN, i
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = T.BYTE
        vocab.tokens.append(text)
        vocab.types.append(int(kind))
        if vocab.scores is not None:
            if text in rank:
                vocab.scores.append(-float(rank[text]))
            else:
                # Single characters and bytes are never made by a merge; a longer token
                # no merge makes comes last.
                vocab.scores.append(0.0 if len(text) == 1 or kind != T.NORMAL else -1e9)
    return vocab


def _classify(data: dict, path: str) -> tuple[str | None, bool]:
    """(llama.cpp pre-tokenizer name, None) for a byte-level BPE tokenizer.json, or
    (None, add_space_prefix) for a SentencePiece-style one; DataError otherwise."""
    pre, norm = data.get("pre_tokenizer"), data.get("normalizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    if "ByteLevel" in kinds:
        if norm is not None:
            raise DataError(
                f"{path}: byte-level BPE with a {norm.get('type')} normalizer; llama.cpp "
                "applies none, so the vocabulary cannot be expressed in GGUF"
            )
        level = steps[-1]
        if kinds == ["ByteLevel"] and level.get("use_regex", True):
            return "gpt-2", False
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            if level.get("use_regex", True):
                return "smollm", False
        if kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True):
            split = steps[0]
            pattern = (split.get("pattern") or {}).get("Regex")
            if split.get("behavior") == "Isolated" and not split.get("invert"):
                for name, regex in SPLITS.items():
                    if pattern == regex:
                        return name, False
        raise DataError(
            f"{path}: byte-level pre-tokenizer {json.dumps(pre)[:300]} is none llama.cpp has "
            f"built in; GGUF can express {list(PRE_TOKENIZERS)}"
        )
    if kinds == ["Metaspace"]:
        scheme = steps[0].get("prepend_scheme")
        prefix = scheme != "never" if scheme else steps[0].get("add_prefix_space", True)
        return None, bool(prefix)
    norm_steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm]
    norm_kinds = [s.get("type") if s else None for s in norm_steps]
    if pre is None and norm_kinds in (["Prepend", "Replace"], ["Replace"]):
        return None, norm_kinds[0] == "Prepend"
    raise DataError(
        f"{path}: tokenizer.json with pre-tokenizer {kinds} and normalizer {norm_kinds} is "
        "neither byte-level BPE nor SentencePiece-style; GGUF cannot express it"
    )


def byte_symbols() -> dict[str, int]:
    """Byte-level BPE's symbol for each byte -> the byte: printable bytes stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    symbols = {chr(b): b for b in printable}
    symbols |= {chr(256 + i): b for i, b in enumerate(others)}
    return symbols


def _check_bytes(vocab: Vocab, where) -> None:
    """llama.cpp spells text its merges cannot cover as byte tokens. A SentencePiece
    vocabulary without its byte-fallback tokens is refused (llama.cpp aborts on any text
    they would spell); a byte-level BPE vocabulary that lacks some of its 256 byte
    symbols is exported as llama.cpp's own converter does, with a warning naming the
    bytes (mostly ones UTF-8 text never holds, such as 0xC0, 0xC1 and 0xF5-0xFF)."""
    if vocab.model == "llama":
        missing = {f"<0x{b:02X}>" for b in range(256)} - set(vocab.tokens)
        if missing:
            raise DataError(
                f"{where}: the vocabulary lacks {len(missing)} of the byte-fallback tokens "
                "<0x00>..<0xFF>; llama.cpp aborts on any text they would spell, so it cannot "
                "be expressed in GGUF (train the tokenizer with byte fallback)"
            )
        return
    symbols = byte_symbols()
    missing = sorted(b for s, b in symbols.items() if s not in set(vocab.tokens))
    if missing:
        logging.warning(
            "%s: the vocabulary lacks %d of the 256 byte-level symbols, for bytes %s; "
            "llama.cpp cannot spell text holding them (as with llama.cpp's own converter)",
            where,
            len(missing),
            ", ".join(f"0x{b:02X}" for b in missing),
        )


def _pad_to(vocab: Vocab, size: int, where) -> None:
    """Fills ids up to `size` with unused tokens; refuses a larger vocabulary."""
    if len(vocab.tokens) > size:
        raise DataError(
            f"{where}: the tokenizer has {len(vocab.tokens)} tokens but the model's "
            f"vocabulary has {size} rows; GGUF needs one token per embedding row"
        )
    for i in range(len(vocab.tokens), size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(int(T.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


# --- Vocab <-> GGUF metadata ---------------------------------------------------------


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Adds the vocabulary's metadata under llama.cpp's tokenizer keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre if vocab.model == "gpt2" else "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("eot", writer.add_eot_token_id),
        ("eom", writer.add_eom_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if getattr(vocab, name) is not None:
            add(getattr(vocab, name))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    templates = [{"name": n, "template": t} for n, t in vocab.named_templates.items()]
    if vocab.chat_template is not None:
        templates.append({"name": "default", "template": vocab.chat_template})
    if templates:
        writer.add_chat_template(templates)


def vocab_from_metadata(get, size: int, where) -> Vocab:
    """The vocabulary of a GGUF file (get(key): a metadata value or None) whose
    embedding has `size` rows; DataError for one this module cannot rebuild."""
    model = get(K.MODEL)
    if model not in ("llama", "gpt2"):
        raise DataError(
            f"{where}: tokenizer.ggml.model={model!r}; expected 'llama' (SentencePiece) or "
            "'gpt2' (byte-level BPE)"
        )
    tokens = get(K.LIST)
    if not tokens or len(tokens) != size:
        raise DataError(
            f"{where}: {len(tokens or [])} tokens for an embedding of {size} rows; expected "
            "one token per row"
        )
    types = get(K.TOKEN_TYPE) or [int(T.NORMAL)] * size
    vocab = Vocab(model=model, tokens=list(tokens), types=[int(t) for t in types])
    if model == "llama":
        vocab.scores = [float(s) for s in get(K.SCORES) or [0.0] * size]
        vocab.add_space_prefix = bool(_default(get(K.ADD_PREFIX), True))
        vocab.remove_extra_whitespaces = bool(_default(get(K.REMOVE_EXTRA_WS), False))
    else:
        pre = _ALIASES.get(get(K.PRE), get(K.PRE))
        if pre not in PRE_TOKENIZERS:
            raise DataError(
                f"{where}: pre-tokenizer {get(K.PRE)!r} is not supported; expected one of "
                f"{list(PRE_TOKENIZERS)}"
            )
        vocab.pre = pre
        vocab.merges = list(get(K.MERGES) or [])
    for name, key in (
        ("bos", K.BOS_ID),
        ("eos", K.EOS_ID),
        ("eot", K.EOT_ID),
        ("eom", K.EOM_ID),
        ("unk", K.UNK_ID),
        ("pad", K.PAD_ID),
    ):
        value = get(key)
        if value is not None and 0 <= value < size:
            setattr(vocab, name, int(value))
    vocab.add_bos = bool(_default(get(K.ADD_BOS), vocab.bos is not None))
    vocab.add_eos = bool(_default(get(K.ADD_EOS), False))
    vocab.chat_template = get(K.CHAT_TEMPLATE)
    for name in get(K.CHAT_TEMPLATES) or []:
        vocab.named_templates[name] = get(K.CHAT_TEMPLATE_N.format(name=name)) or ""
    return vocab


def _default(value, default):
    return default if value is None else value
