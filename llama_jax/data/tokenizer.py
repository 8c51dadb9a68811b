"""Tokenizers: one `Tokenizer` over a SentencePiece `tokenizer.model` (LLaMA 1/2) and a Hugging
Face `tokenizer.json` (LLaMA 3 and newer).

The two file kinds disagree about special tokens: a SentencePiece model stores its own BOS/EOS/pad
ids and adds none of them, while a tokenizer.json's post-processor may add BOS by itself and knows
nothing of EOS ids for generation. So a backend here only maps plain text to ids and back, and
`Tokenizer` owns the special tokens: `add_bos=True` means exactly one BOS whatever the file, and
`eos_ids` are the ids generation stops on. `Tokenizer.from_dir` resolves them from the model
directory's JSON files as transformers does.

tokenizer.json is read with the `tokenizers` library: transformers is only the tests' reference,
and pickled tokenizers are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece
import tokenizers

from llama_jax.errors import DataError

HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class _SentencePiece:
    """A SentencePiece model; encodes without BOS/EOS, decodes control pieces only on request."""

    def __init__(self, path: str):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (RuntimeError, OSError) as e:
            hint = ""
            if _looks_like_tiktoken(path):
                hint = (
                    " It looks like a tiktoken BPE file (Meta's original LLaMA 3 download); "
                    "use the Hugging Face tokenizer.json instead."
                )
            raise DataError(f"{path} is not a valid SentencePiece model: {e}.{hint}") from e

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def default_special_ids(self) -> tuple[int | None, tuple[int, ...], int | None]:
        # SentencePiece reports an unset special id as -1.
        sp = self._sp
        bos, eos, pad = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        return bos, (() if eos is None else (eos,)), pad

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.PieceToId(token)
        # PieceToId answers the unk id for any piece it does not know.
        return None if self._sp.IsUnknown(i) and self._sp.IdToPiece(i) != token else i

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, out_type=int)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self._sp.Decode(ids)
        # Decode drops control pieces (BOS/EOS/pad), so they are spliced in as their text.
        parts, run = [], []
        for i in ids:
            if self._sp.IsControl(i):
                parts += [self._sp.Decode(run), self._sp.IdToPiece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.Decode(run))
        return "".join(parts)


class _HFTokenizers:
    """A Hugging Face tokenizer.json; encodes without its post-processor's special tokens."""

    def __init__(self, path: str):
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files.
            raise DataError(f"{path} is not a valid tokenizer.json: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def default_special_ids(self) -> tuple[int | None, tuple[int, ...], int | None]:
        return None, (), None

    def post_processor_adds(self, token_id: int) -> bool:
        return token_id in self._tok.encode("", add_special_tokens=True).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class Tokenizer:
    """Text <-> token ids with the model's special tokens; build with `from_dir` or `from_file`.

    `encode` returns plain text's ids, with BOS/EOS only where asked for: `add_bos=None` (the
    default) follows the model (tokenizer_config.json's `add_bos_token`, else whether the
    tokenizer adds BOS on its own, which LLaMA 1/2/3 all do); `add_eos` is always explicit because
    an EOS at the end of a prompt stops generation.
    """

    def __init__(
        self,
        backend: _SentencePiece | _HFTokenizers,
        *,
        path: str,
        bos_id: int | None,
        eos_ids: tuple[int, ...],
        pad_id: int | None,
        add_bos_default: bool,
    ):
        if add_bos_default and bos_id is None:
            raise DataError(
                f"{path}: add_bos_token is true but no BOS token is set (bos_token in "
                "tokenizer_config.json, bos_token_id in generation_config.json or config.json)"
            )
        self._backend = backend
        self.path = path
        self._bos_id = bos_id
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._add_bos_default = add_bos_default
        self._special_ids = frozenset(
            [i for i in (bos_id, pad_id) if i is not None] + list(eos_ids)
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `*.json` (tokenizers) or `*.model` (SentencePiece) file on its own.

        Special ids are the file's own: a SentencePiece model's, and none for a tokenizer.json
        (use `from_dir` to read them from the model directory's configs).
        """
        path = _local_copy(os.fspath(path), (os.path.basename(os.fspath(path)),))
        backend = _load_backend(path)
        bos_id, eos_ids, pad_id = backend.default_special_ids()
        return cls(
            backend,
            path=path,
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            add_bos_default=bos_id is not None,
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Loads `tokenizer.json` if the directory has one, else `tokenizer.model`.

        Special ids, highest priority first (transformers' resolution; EOS follows generation,
        which stops on generation_config.json's ids):
          bos/pad: tokenizer_config.json `bos_token`/`pad_token`, generation_config.json then
            config.json `bos_token_id`/`pad_token_id`, the SentencePiece model's own ids;
          eos: generation_config.json `eos_token_id` (int or list), tokenizer_config.json
            `eos_token`, config.json `eos_token_id`, the SentencePiece model's own id.
        """
        model_dir = _local_copy(os.fspath(model_dir), _DIR_FILES)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE):
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                break
        else:
            raise FileNotFoundError(
                f"no tokenizer in {model_dir!r}: looked for {HF_TOKENIZER_FILE!r} "
                f"and {SENTENCEPIECE_FILE!r}"
            )
        backend = _load_backend(path)
        cfg = _ModelConfigs(backend, path)
        sp_bos, sp_eos, sp_pad = backend.default_special_ids()
        gen, model = "generation_config.json", "config.json"
        bos_id = _first(
            cfg.token("bos_token"),
            cfg.one(gen, "bos_token_id"),
            cfg.one(model, "bos_token_id"),
            sp_bos,
        )
        pad_id = _first(
            cfg.token("pad_token"),
            cfg.one(gen, "pad_token_id"),
            cfg.one(model, "pad_token_id"),
            sp_pad,
        )
        eos_token = cfg.token("eos_token")
        eos_ids = _first(
            cfg.ids(gen, "eos_token_id"),
            None if eos_token is None else (eos_token,),
            cfg.ids(model, "eos_token_id"),
            sp_eos,
        )
        add_bos = cfg.add_bos_token()
        if add_bos is None:
            add_bos = bos_id is not None and (
                not isinstance(backend, _HFTokenizers) or backend.post_processor_adds(bos_id)
            )
        return cls(
            backend,
            path=path,
            bos_id=bos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            add_bos_default=add_bos,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's padded V)."""
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (LLaMA 3 instruct has several); empty if none."""
        return self._eos_ids

    @property
    def eos_id(self) -> int | None:
        """The first of `eos_ids`: what `add_eos` appends."""
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with exactly one BOS in front when `add_bos` (None: the model's
        default) and `eos_id` appended when `add_eos`. Special-token text in `text` (e.g.
        "<|eot_id|>" in a tokenizer.json) becomes its special id, as in transformers."""
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool | None = None, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` of each text (ragged: no padding), batched inside the backend."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one str; use encode")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"expected str to encode, got {type(text).__name__}: {text!r}")
        if add_bos is None:
            add_bos = self._add_bos_default
        prefix = [self._require(self._bos_id, "BOS", "add_bos")] if add_bos else []
        suffix = [self._require(self.eos_id, "EOS", "add_eos")] if add_eos else []
        return [prefix + ids + suffix for ids in self._backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: int[T] (a list or an integer array). With `skip_special_tokens`, BOS,
        EOS, pad and the tokenizer's other special tokens are left out."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids, skip_special_tokens)

    def decode_batch(
        self, batch: Iterable[Iterable[int]] | np.ndarray, *, skip_special_tokens: bool = True
    ) -> list[str]:
        """`decode` of each row of `batch`: int[B, T] or a list of B id lists."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_ids={self._eos_ids}, pad_id={self._pad_id})"
        )

    def _require(self, token_id: int | None, what: str, flag: str) -> int:
        if token_id is None:
            raise DataError(f"{flag}=True but {self.path} has no {what} token")
        return token_id

    def _check_ids(self, ids: Iterable[int] | np.ndarray) -> list[int]:
        # Arrays (numpy or jax) convert whole; iterating a device array would copy per element.
        arr = np.asarray(
            ids if hasattr(ids, "__array__") or isinstance(ids, Sequence) else list(ids)
        )
        if arr.ndim != 1:
            raise DataError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return []
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"expected integer token ids, got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise DataError(
                f"token id {int(bad[0])} is outside this tokenizer's vocabulary "
                f"[0, {self.vocab_size}) ({self.path})"
            )
        return arr.tolist()


class _ModelConfigs:
    """The special-token settings in a model directory's JSON files, validated against the
    vocabulary; a setting that is absent or null reads as None."""

    def __init__(self, backend: _SentencePiece | _HFTokenizers, tokenizer_path: str):
        self._backend = backend
        self._tokenizer_path = tokenizer_path
        self._dir = os.path.dirname(tokenizer_path)
        self._configs = {
            name: _read_json_object(os.path.join(self._dir, name))
            for name in ("tokenizer_config.json", "generation_config.json", "config.json")
        }

    def token(self, key: str) -> int | None:
        """tokenizer_config.json's `key` (a token string, or a dict with "content") as an id."""
        value = self._configs["tokenizer_config.json"].get(key)
        if value is None:
            return None
        where = os.path.join(self._dir, "tokenizer_config.json")
        content = value.get("content") if isinstance(value, dict) else value
        if not isinstance(content, str):
            raise DataError(
                f"{key} in {where} is {value!r}; expected a token string or a dict with 'content'"
            )
        token_id = self._backend.token_to_id(content)
        if token_id is None:
            raise DataError(
                f"{key} {content!r} in {where} is not in the vocabulary of {self._tokenizer_path}"
            )
        return token_id

    def add_bos_token(self) -> bool | None:
        value = self._configs["tokenizer_config.json"].get("add_bos_token")
        if value is not None and not isinstance(value, bool):
            where = os.path.join(self._dir, "tokenizer_config.json")
            raise DataError(f"add_bos_token in {where} is {value!r}; expected true or false")
        return value

    def ids(self, file: str, key: str) -> tuple[int, ...] | None:
        """`key` in `file`: an id or a list of ids."""
        value = self._configs[file].get(key)
        # -1 is how LLaMA's params.json and SentencePiece spell "none", and some converted
        # config.json files kept it.
        if value is None or value == -1:
            return None
        where = os.path.join(self._dir, file)
        values = value if isinstance(value, list) else [value]
        for v in values:
            # bool is an int subclass, and `true` is no token id.
            if not isinstance(v, int) or isinstance(v, bool):
                raise DataError(f"{key} in {where} is {value!r}; expected ids")
            if not 0 <= v < self._backend.vocab_size:
                raise DataError(
                    f"{key} {v} in {where} is outside the vocabulary [0, "
                    f"{self._backend.vocab_size}) of {self._tokenizer_path}"
                )
        return tuple(values)

    def one(self, file: str, key: str) -> int | None:
        """`key` in `file`: a single id."""
        ids = self.ids(file, key)
        if ids is None:
            return None
        if len(ids) != 1:
            where = os.path.join(self._dir, file)
            raise DataError(f"{key} in {where} is {list(ids)}; expected a single id")
        return ids[0]


# The files of a model directory a tokenizer is read from.
_DIR_FILES = (
    HF_TOKENIZER_FILE,
    SENTENCEPIECE_FILE,
    "tokenizer_config.json",
    "generation_config.json",
    "config.json",
)


def _local_copy(path: str, names: Sequence[str]) -> str:
    """`path` itself when local; for a remote file or directory (gs://...), a copy in the local
    temporary directory (a file: `names` is its own name; a directory: those of `names` it
    holds), since the tokenizer libraries read local files only. Each file is written under a
    temporary name and renamed, so processes copying at once never see part of one."""
    if "://" not in path:
        return path
    from etils import epath

    remote = epath.Path(path)
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), f"llama_jax_tokenizer_{key}")
    if not remote.exists():
        raise FileNotFoundError(f"{path!r} does not exist")
    is_dir = remote.is_dir()
    sources = [remote / n for n in names] if is_dir else [remote]
    os.makedirs(local, exist_ok=True)
    for source in sources:
        target = os.path.join(local, source.name)
        if not source.exists():
            if os.path.exists(target):
                os.remove(target)
            continue
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(source.read_bytes())
        os.replace(tmp, target)
    return local if is_dir else os.path.join(local, remote.name)


def _load_backend(path: str) -> _SentencePiece | _HFTokenizers:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    if path.endswith(".json"):
        return _HFTokenizers(path)
    if path.endswith(".model"):
        return _SentencePiece(path)
    raise DataError(
        f"cannot tell the kind of tokenizer file {path!r}: expected a name ending in .json "
        "(Hugging Face tokenizers) or .model (SentencePiece)"
    )


def _read_json_object(path: str) -> dict:
    """A JSON object file's contents; {} when the file is absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _first(*values):
    """The first value that is set (not None); 0 is a valid id, so no `or` chains."""
    return next((v for v in values if v is not None), None)


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?\n")


def _looks_like_tiktoken(path: str) -> bool:
    with open(path, "rb") as f:
        return _TIKTOKEN_LINE.match(f.readline()) is not None
