"""GGUF: writing model directories for llama.cpp, reading LLaMA GGUF files back.

transformers' GGUF loader is the reference for export (it undoes llama.cpp's RoPE row
order itself), except for llama3 RoPE scaling, which transformers 5 ignores for LLaMA:
there the reference is our own import and, where it is installed, llama.cpp.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from flax import nnx
from hf_models import make_hf_model, rewrite_config
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from llama_jax import nn, sharding, tree
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.formats import ModelDir, model_dir, transforms
from llama_jax.formats.gguf import read as gguf_import
from llama_jax.formats.gguf import tensors as gguf_model
from llama_jax.formats.gguf import vocab as gguf_vocab
from llama_jax.formats.gguf import write as gguf_export
from llama_jax.formats.hf import keymap as hf_keymap
from llama_jax.formats.hf import layout as hf
from llama_jax.nn import generation as generate

REPO = str(Path(__file__).parents[1])
Q = gguf.GGMLQuantizationType
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
TEXT = "The quick fox, it's 12345 steps!\n\n    def f(x):\treturn x"
# Shapes whose rows are multiples of Q8_0's 32-value blocks: D = N*H = 64, F = 96.
ARCH = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
# |Δlogit| <= SLACK * eps * max|logit| against the float model, eps being the type's
# relative rounding (Q8_0: its block bound relative to the block's largest value). The
# tight checks are per weight (`_check_rounding`) and on the file's own weights (1e-4).
EPS = {"f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1 / 254 + 2.0**-11}
SLACK = 16


def _corpus():
    lines = Path(REPO, "configs/data/tiny_corpus.txt").read_text().split("\n\n")[:400]
    return lines + [TEXT, "x = [1, 2, 3]\nprint(x)  # café ünïcode"]


def _bpe_json(path, vocab=300, alphabet=None):
    """A LLaMA 3-style tokenizer.json: byte-level BPE after the LLaMA 3 split, its
    initial alphabet every byte symbol (or `alphabet`)."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, level])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=alphabet or pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok.save(str(path))
    return tok


def _sp_model(prefix, model_type="bpe", vocab=300):
    """A LLaMA 2-style tokenizer.model: SentencePiece BPE with byte fallback."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(prefix),
        vocab_size=vocab,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return Path(f"{prefix}.model")


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    _bpe_json(root / "tokenizer.json")
    sp = _sp_model(root / "sp")
    return {"bpe": root / "tokenizer.json", "sentencepiece": sp}


def _converted(root, tokenizer: Path, **overrides) -> Path:
    """A converted directory of a random HF LLaMA with the given tokenizer file; the
    vocabulary has 5 rows more than the tokenizer (padding tokens in GGUF)."""
    hf_dir = root / "hf"
    hf_dir.mkdir(parents=True)
    if tokenizer.suffix == ".json":
        shutil.copy(tokenizer, hf_dir / "tokenizer.json")
        vocab = tokenizers.Tokenizer.from_file(str(tokenizer)).get_vocab_size()
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
        ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    else:
        shutil.copy(tokenizer, hf_dir / "tokenizer.model")
        vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    make_hf_model(hf_dir, vocab_size=vocab + 5, **(ARCH | ids | overrides))
    out = root / "converted"
    transforms.convert_hf(hf_dir, out, mesh=sharding.create_mesh(fsdp=8))
    return out


MODELS = {
    "untied-bpe": ("bpe", dict(tie_word_embeddings=False)),
    "tied-sentencepiece": ("sentencepiece", dict(tie_word_embeddings=True, seed=1)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory, tokenizer_files):
    kind, overrides = MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    return _converted(root, tokenizer_files[kind], **overrides)


def _tokens(vocab, shape=(2, 23)):
    return np.random.RandomState(0).randint(0, vocab, shape)


def _transformers_logits(path: Path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _logits(directory, tokens, params=None):
    """llama_jax's logits for the model in `directory`, with `params` (flat, host
    arrays) in place of its own when given."""
    model, _ = model_dir.load_model(directory)
    if params is not None:
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, tree.nest({k: jnp.asarray(v) for k, v in params.items()}))
        model = nnx.merge(graphdef, state)
    return np.asarray(model(tokens))


def _file_params(path, config):
    f = gguf_import.GGUFFile(path)
    names = tree.flatten(nn.abstract_params(config, sharding.create_mesh())[1])
    return {n: f.read_param(config, n, None, np.float32) for n in names}


def _q8_0_bound(w: np.ndarray) -> np.ndarray:
    """The stated Q8_0 bound per value: |w - q * fp16(d)| <= d/2 + 127 |d - fp16(d)|,
    d = max |w| over the value's block of 32 along a row / 127."""
    blocks = w.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    bound = d / 2 + 127 * np.abs(d - d.astype(np.float16).astype(np.float32))
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


def _check_rounding(path, directory, kind):
    """Each tensor of the file is the model's, rounded as `kind` rounds it."""
    config = ModelDir.open(directory).config
    f = gguf_import.GGUFFile(path)
    for name, x in ModelDir.open(directory).iter_host_params():
        stacked = x if "{i}" in gguf_model.TENSOR_NAMES[name] else x[None]
        for gguf_name, layer in zip(gguf_model.tensor_names(name, config), stacked, strict=True):
            want = gguf_model.to_gguf(name, layer, config).astype(np.float32)
            got = np.asarray(f.read(gguf_name), np.float32)
            kind_here = kind if want.ndim == 2 else "f32"
            assert f.tensors[gguf_name].tensor_type.name == kind_here.upper(), gguf_name
            if kind_here == "f32":
                np.testing.assert_array_equal(got, want, err_msg=gguf_name)
            elif kind_here in ("f16", "bf16"):
                dt = np.float16 if kind_here == "f16" else ml_dtypes.bfloat16
                np.testing.assert_array_equal(got, want.astype(dt).astype(np.float32))
            else:
                err = np.abs(got - want)
                assert (err <= _q8_0_bound(want) * (1 + 1e-6)).all(), gguf_name
                assert err.max() > 0, "Q8_0 rounds"


@pytest.mark.parametrize("kind", gguf_export.TYPES)
def test_export_loads_in_transformers_with_llama_jax_logits(model, tmp_path, kind):
    config = ModelDir.open(model).config
    path = gguf_export.export_gguf(model, tmp_path / f"model-{kind}.gguf", kind=kind)
    assert not list(tmp_path.glob(".*"))
    tokens = _tokens(config.vocab_size)
    theirs = _transformers_logits(path, tokens)
    # The file's own weights, through llama_jax: equal up to float32 summation order.
    ours_on_file = _logits(model, tokens, _file_params(path, config))
    np.testing.assert_allclose(theirs, ours_on_file, atol=1e-4, rtol=0)
    _check_rounding(path, model, kind)
    ours = _logits(model, tokens)
    assert np.abs(ours).max() > 1
    if kind == "f32":
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        want = model_dir.load_tokenizer(model).encode(TEXT)
        assert tok(TEXT)["input_ids"] == want
    else:
        bound = SLACK * EPS[kind] * np.abs(ours).max()
        assert 0 < np.abs(theirs - ours).max() <= bound


def test_metadata_is_what_llama_cpp_reads(model, tmp_path):
    path = gguf_export.export_gguf(model, tmp_path / "m.gguf", kind="q8_0")
    f = gguf_import.GGUFFile(path)
    config = ModelDir.open(model).config
    spm = (model.parent / "hf" / "tokenizer.model").exists()
    want = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama" if spm else "gpt2",
        "tokenizer.ggml.pre": "default" if spm else "llama-bpe",
        "tokenizer.ggml.bos_token_id": config.bos_token_id,
        "tokenizer.ggml.eos_token_id": config.eos_token_ids[0],
        "tokenizer.ggml.add_bos_token": True,
    }
    assert {k: f.get(k) for k in want} == want
    assert f.get("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = f.get("tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert f.get("tokenizer.ggml.token_type")[-1] == gguf.TokenType.UNUSED
    assert ("output.weight" in f.tensors) != config.tie_word_embeddings
    if spm:
        assert len(f.get("tokenizer.ggml.scores")) == config.vocab_size
    else:
        assert f.get("tokenizer.ggml.merges")[:1] and "{%" in f.get("tokenizer.chat_template")


def test_every_kind_of_directory_gives_the_same_file(model, tmp_path):
    hf_file = gguf_export.export_gguf(model.parent / "hf", tmp_path / "hf.gguf", kind="bf16")
    converted = gguf_export.export_gguf(model, tmp_path / "converted.gguf", kind="bf16")
    a, b = gguf_import.GGUFFile(hf_file), gguf_import.GGUFFile(converted)
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        assert np.array_equal(t.data, b.tensors[name].data), name
    assert a.get("llama_jax.config") == b.get("llama_jax.config")


def test_rows_q8_0_cannot_pack_stay_f16():
    config = LlamaConfig(
        vocab_size=300,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=94,
        tie_word_embeddings=True,
    )
    params = list(tree.flatten(nn.abstract_params(config, sharding.create_mesh())[1]))
    types = {e.name: e.type for e in gguf_export.plan(config, params, "q8_0")}
    assert types["blk.1.ffn_down.weight"] == Q.F16  # rows of F = 94 values
    assert types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32 and "output.weight" not in types
    assert len(types) == 2 + 2 * 9


def _llama_cpp_rope_freqs(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's converter's formula for the rope_freqs tensor, written out here."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_round_trips_through_import(tmp_path, tokenizer_files):
    source = _converted(
        tmp_path,
        tokenizer_files["bpe"],
        rope_scaling=LLAMA3_ROPE,
        head_dim=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config = ModelDir.open(source).config
    path = gguf_export.export_gguf(source, tmp_path / "m.gguf", kind="f32")
    f = gguf_import.GGUFFile(path)
    np.testing.assert_allclose(
        f.read(gguf_model.ROPE_FREQS),
        _llama_cpp_rope_freqs(config.rope_scaling, config.rope_theta, config.head_dim),
        rtol=1e-6,
    )
    back = gguf_import.import_gguf(path, tmp_path / "back", mesh=sharding.create_mesh(fsdp=8))
    assert ModelDir.open(back).config == config
    meta = json.loads((back / "metadata.json").read_text())
    assert meta["source"]["kind"] == "gguf" and meta["dtype"] == "float32"
    a, b = (dict(ModelDir.open(d).iter_host_params()) for d in (source, back))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Past the original 16 positions, where the scaling matters.
    tokens = _tokens(config.vocab_size, (1, 48))
    np.testing.assert_allclose(_logits(back, tokens), _logits(source, tokens), atol=1e-6)
    assert model_dir.load_tokenizer(back).encode(TEXT) == model_dir.load_tokenizer(source).encode(
        TEXT
    )
    # A file from another tool has no llama_jax.config: the scaling comes from rope_freqs.
    shapes = f.shapes()
    special = {"bos": 0, "eos": 1}
    fitted = gguf_model.config_from_metadata(
        lambda k: None if k == gguf_model.CONFIG_KEY else f.get(k),
        shapes,
        lambda: np.asarray(f.read(gguf_model.ROPE_FREQS)),
        special,
        path,
    )
    assert fitted.rope_scaling == config.rope_scaling
    assert fitted.replace(initializer_range=config.initializer_range) == config


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b", "tiny"])
def test_llama3_scaling_is_recovered_from_rope_freqs(preset):
    from llama_jax.config import PRESETS

    c = PRESETS[preset]
    freqs = _llama_cpp_rope_freqs(c.rope_scaling, c.rope_theta, c.head_dim)
    assert gguf_model.fit_llama3(freqs, c.rope_theta, c.head_dim) == c.rope_scaling
    with pytest.raises(Exception, match="not a llama3 RoPE scaling"):
        gguf_model.fit_llama3(np.linspace(1, 3, c.head_dim // 2), c.rope_theta, c.head_dim)


def test_linear_rope_scaling_is_metadata(tmp_path):
    config = LlamaConfig(
        vocab_size=300,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=96,
        rope_scaling=RopeScaling("linear", 2.5),
        rope_theta=5e5,
        rms_norm_eps=1e-6,
    )
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    gguf_model.write_config(writer, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def get(key):
        field = reader.fields.get(key)
        return None if field is None or key == gguf_model.CONFIG_KEY else field.contents()

    assert get("llama.rope.scaling.type") == "linear"
    got = gguf_model.config_from_metadata(
        get,
        {"token_embd.weight": (300, 64), "output.weight": (300, 64)},
        None,
        {"bos": 1, "eos": 2},
        "test",
    )
    assert got == config


def _test_tensors(config: LlamaConfig, rng) -> dict[str, np.ndarray]:
    """Random HF-layout weights ([out, in]) of `config`, by HF tensor name."""
    dims = hf.layout_dims(config)
    names = tree.flatten(nn.abstract_params(config, sharding.create_mesh())[1])
    out = {}
    for name in names:
        _, layout, _ = hf_keymap.PARAMS[name]
        for tensor in hf.hf_tensor_names(name, config):
            shape = hf.hf_shape(layout, dims)
            scale = 1.0 if name.endswith("scale") else 0.1
            out[tensor] = (
                scale * (1 + 0.1 * rng.standard_normal(shape))
                if scale == 1.0
                else scale * rng.standard_normal(shape)
            ).astype(np.float32)
    return out


# Block types per weight, one of each the import must read; ffn_down's rows are F = 256
# values long, one Q4_K super-block.
TYPES = {
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.F16,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q4_K,
    "token_embd": Q.F16,
    "output": Q.Q8_0,
}
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    parts = hf_name.removesuffix(".weight").split(".")
    if parts[0] == "model" and parts[1] == "layers":
        return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:])]}.weight"
    return HF_TO_GGUF[".".join(parts)] + ".weight"


def _pairs_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's adjacent pairs, per head."""
    h = w.shape[0] // heads
    return w.reshape(heads, 2, h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpair(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `_pairs_rows`."""
    h = w.shape[0] // heads
    return w.reshape(heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(kind: Q, shape, rng) -> np.ndarray:
    """Random blocks of a type the gguf package cannot quantize (Q4_K, IQ4_NL), each
    starting with small float16 scales (Q4_K: the scale and the min)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    blocks[:, :4] = np.array([2e-4, 1e-4], np.float16).view(np.uint8)
    return blocks.reshape(gguf.quant_shape_to_byte_shape(shape, kind))


def _write_gguf(path, config, tensors, sp_path, *, arch="llama", types=TYPES, extra=None):
    """A LLaMA GGUF file written with the gguf package alone: tensors (HF layout) in
    llama.cpp's layout and `types`, a SentencePiece vocabulary. Returns the tensors the
    file holds, dequantized, by GGUF name (HF row order)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.embed_dim)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.mlp_dim)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_tokenizer_model("llama")
    n = sp.vocab_size()
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    w.add_token_types(kinds)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    held = {}
    rng = np.random.default_rng(1)
    for hf_name, x in tensors.items():
        name = _gguf_name(hf_name)
        if "q_proj" in hf_name:
            x = _pairs_rows(x, config.num_heads)
        elif "k_proj" in hf_name:
            x = _pairs_rows(x, config.num_kv_heads)
        kind = types.get(name.split(".")[-2], Q.F32) if x.ndim == 2 else Q.F32
        if kind in (Q.Q4_K, Q.IQ4_NL):
            data = _random_blocks(kind, x.shape, rng)
        elif kind in (Q.F32, Q.F16):
            data = x.astype(np.float16 if kind == Q.F16 else np.float32)
        else:
            data = gguf.quants.quantize(x, kind)
        w.add_tensor(name, data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
        held[name] = gguf.quants.dequantize(data, kind).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


THIRD_PARTY = LlamaConfig(
    vocab_size=300,
    embed_dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=256,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=None,
)


def test_a_file_written_with_the_gguf_package_imports_exactly(tmp_path, tokenizer_files):
    config = THIRD_PARTY
    tensors = _test_tensors(config, np.random.default_rng(0))
    held = _write_gguf(tmp_path / "m.gguf", config, tensors, tokenizer_files["sentencepiece"])
    out = gguf_import.import_gguf(
        tmp_path / "m.gguf", tmp_path / "out", mesh=sharding.create_mesh(fsdp=2, tensor=4)
    )
    assert ModelDir.open(out).config.replace(initializer_range=0.02) == config
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["dtype"] == "float32"
    assert meta["source"]["tensor_types"] == {
        "F32": 5,
        "Q8_0": 5,
        "Q4_0": 2,
        "Q4_1": 2,
        "F16": 3,
        "BF16": 2,
        "Q4_K": 2,
    }
    dims = hf.layout_dims(config)
    for name, x in ModelDir.open(out).iter_host_params():
        hf_name, hf_layout, proj_layout = hf_keymap.PARAMS[name]
        parts = [x] if "{i}" not in hf_name else list(x)
        for tensor, part in zip(hf.hf_tensor_names(name, config), parts, strict=True):
            want = held[_gguf_name(tensor)]
            if "q_proj" in tensor or "k_proj" in tensor:
                heads = config.num_heads if "q_proj" in tensor else config.num_kv_heads
                want = _unpair(want, heads)
            got = hf.project_to_hf(part, hf_layout, proj_layout, dims)
            np.testing.assert_array_equal(got, want, err_msg=tensor)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_files["sentencepiece"]))
    assert model_dir.load_tokenizer(out).encode(TEXT, add_bos=False) == sp.encode(TEXT)
    tokens = _tokens(config.vocab_size)
    np.testing.assert_allclose(
        _transformers_logits(tmp_path / "m.gguf", tokens), _logits(out, tokens), atol=1e-4
    )


def test_an_int8_directory_is_packed_as_q8_0_from_its_dequantized_weights(model, tmp_path):
    int8 = transforms.quantize_dir(model, tmp_path / "int8", mesh=sharding.create_mesh(fsdp=8))
    path = gguf_export.export_gguf(int8, tmp_path / "m.gguf")
    config = ModelDir.open(model).config
    f = gguf_import.GGUFFile(path)
    assert f.get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    held = dict(gguf_export.float_params(ModelDir.open(int8)))
    original = dict(ModelDir.open(model).iter_host_params())
    for name, x in held.items():
        assert x.dtype == original[name].dtype == np.float32, name
        stacked = x if "{i}" in gguf_model.TENSOR_NAMES[name] else x[None]
        for gguf_name, layer in zip(gguf_model.tensor_names(name, config), stacked, strict=True):
            want = gguf_model.to_gguf(name, layer, config)
            got = np.asarray(f.read(gguf_name), np.float32)
            if want.ndim == 1:
                np.testing.assert_array_equal(got, want)
            else:
                # The Q8_0 blocks of the int8 model's own (dequantized) weights.
                assert (np.abs(got - want) <= _q8_0_bound(want) * (1 + 1e-6)).all()
    tokens = _tokens(config.vocab_size)
    np.testing.assert_allclose(
        _transformers_logits(path, tokens),
        _logits(model, tokens, _file_params(path, config)),
        atol=1e-4,
    )


# --- bad input ---------------------------------------------------------------------------


def _no_output(path):
    path = Path(path)
    return not path.exists() and not list(path.parent.glob(f".{path.name}*"))


def _metaspace(tmp, files):
    return Path(REPO, "configs/data/tokenizer.json")


def _custom_split(tmp, files):
    data = json.loads(files["bpe"].read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    path = Path(tmp, "tokenizer.json")
    path.write_text(json.dumps(data))
    return path


def _unigram(tmp, files):
    return _sp_model(Path(tmp, "unigram"), model_type="unigram", vocab=300)


def _too_big(tmp, files):
    return _sp_model(Path(tmp, "big"), vocab=400)


def test_byte_symbols_are_the_byte_level_alphabet():
    symbols = gguf_vocab.byte_symbols()
    assert sorted(symbols.values()) == list(range(256))
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols["\u0120"] == 0x20 and symbols["A"] == 0x41 and symbols["\u0100"] == 0x00


# The bytes a published 135M byte-level BPE LLaMA's vocabulary has no symbol for (its
# GGUF is llama.cpp's own conversion): rare control characters and bytes UTF-8 never holds.
MISSING_BYTES = [4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)]


def test_a_byte_level_vocabulary_lacking_some_byte_symbols_exports_with_a_warning(tmp_path, caplog):
    symbols = gguf_vocab.byte_symbols()
    alphabet = [s for s, b in symbols.items() if b not in MISSING_BYTES]
    tok = _bpe_json(tmp_path / "tokenizer.json", alphabet=alphabet)
    assert not {s for s, b in symbols.items() if b in MISSING_BYTES} & set(tok.get_vocab())
    directory = _converted(tmp_path / "m", tmp_path / "tokenizer.json")
    out = tmp_path / "m.gguf"
    with caplog.at_level("WARNING"):
        gguf_export.export_gguf(directory, out, kind="f32")
    warned = [r.getMessage() for r in caplog.records if "byte-level symbols" in r.getMessage()]
    assert len(warned) == 1
    assert "lacks 21 of the 256" in warned[0] and "0x04, 0x06, 0x13" in warned[0]
    assert "0xC0, 0xC1, 0xF1, 0xF2, 0xF5" in warned[0] and warned[0].endswith(
        "0xFF; llama.cpp cannot spell text holding them (as with llama.cpp's own converter)"
    )
    # transformers' GGUF reader loads the file and computes llama_jax's logits; the
    # directory imported back from it exports again.
    config = ModelDir.open(directory).config
    tokens = _tokens(config.vocab_size)
    np.testing.assert_allclose(
        _transformers_logits(out, tokens), _logits(directory, tokens), atol=1e-4
    )
    back = tmp_path / "back"
    gguf_import.import_gguf(out, back, mesh=sharding.create_mesh())
    gguf_export.export_gguf(back, tmp_path / "again.gguf", kind="f32")
    assert (tmp_path / "again.gguf").exists()


@pytest.mark.parametrize(
    "make,match",
    [
        (_metaspace, "byte-fallback tokens"),
        (_custom_split, "none llama.cpp has built in"),
        (_unigram, "UNIGRAM"),
        (_too_big, "one token per embedding row"),
    ],
    ids=["no-byte-tokens", "unknown-pre-tokenizer", "unigram", "more-tokens-than-rows"],
)
def test_a_tokenizer_gguf_cannot_express_is_refused(model, tmp_path, tokenizer_files, make, match):
    out = tmp_path / "m.gguf"
    with pytest.raises(DataError, match=match):
        gguf_export.export_gguf(model, out, tokenizer=make(tmp_path, tokenizer_files))
    assert _no_output(out)


def test_export_refuses_an_existing_file_and_a_rope_llama_cpp_lacks(model, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="overwrite"):
        gguf_export.export_gguf(model, out)
    # --overwrite replaces only a GGUF file this project wrote.
    with pytest.raises(CheckpointError, match="not a GGUF file this project wrote"):
        gguf_export.export_gguf(model, out, kind="f16", overwrite=True)
    assert out.read_bytes() == b"keep me"
    out.unlink()
    gguf_export.export_gguf(model, out, kind="f32")
    first = out.read_bytes()
    with pytest.raises(CheckpointError, match="bogus"):
        gguf_export.export_gguf(model, out, kind="bogus", overwrite=True)
    assert out.read_bytes() == first
    gguf_export.export_gguf(model, out, kind="f16", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF" and out.read_bytes() != first
    assert not list(tmp_path.glob(".*"))

    hf_dir = tmp_path / "yarn"
    shutil.copytree(model.parent / "hf", hf_dir)
    rewrite_config(hf_dir, lambda d: d | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="yarn"):
        gguf_export.export_gguf(hf_dir, tmp_path / "yarn.gguf")
    assert _no_output(tmp_path / "yarn.gguf")
    with pytest.raises(ConfigError, match="is a directory, expected a file"):
        gguf_export.export_gguf(model, tmp_path, overwrite=True)


def _bad_arch(tmp, sp):
    _write_gguf(
        tmp / "m.gguf",
        THIRD_PARTY,
        _test_tensors(THIRD_PARTY, np.random.default_rng(0)),
        sp,
        arch="qwen2",
    )


def _truncated(tmp, sp):
    _write_gguf(
        tmp / "m.gguf",
        THIRD_PARTY,
        _test_tensors(THIRD_PARTY, np.random.default_rng(0)),
        sp,
        types={},
    )
    data = (tmp / "m.gguf").read_bytes()
    (tmp / "m.gguf").write_bytes(data[: len(data) * 2 // 3])


def _iq_type(tmp, sp):
    tensors = _test_tensors(THIRD_PARTY, np.random.default_rng(0))
    _write_gguf(tmp / "m.gguf", THIRD_PARTY, tensors, sp, types=TYPES | {"ffn_up": Q.IQ4_NL})


def _experts(tmp, sp):
    tensors = _test_tensors(THIRD_PARTY, np.random.default_rng(0))
    _write_gguf(tmp / "m.gguf", THIRD_PARTY, tensors, sp, extra={"llama.expert_count": 8})


def _extra_tensor(tmp, sp):
    tensors = _test_tensors(THIRD_PARTY, np.random.default_rng(0))
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4, 64), np.float32)
    HF_TO_GGUF["mlp.extra"] = "ffn_extra"
    try:
        _write_gguf(tmp / "m.gguf", THIRD_PARTY, tensors, sp)
    finally:
        del HF_TO_GGUF["mlp.extra"]


@pytest.mark.parametrize(
    "make,match",
    [
        (_bad_arch, "architecture='qwen2'"),
        (_truncated, "truncated"),
        (_iq_type, "IQ4_NL"),
        (_experts, "mixture-of-experts"),
        (_extra_tensor, "unexpected tensor blk.0.ffn_extra.weight"),
    ],
    ids=["not-llama", "truncated", "unsupported-type", "experts", "extra-tensor"],
)
def test_a_gguf_llama_jax_cannot_import_is_refused(tmp_path, tokenizer_files, make, match):
    make(tmp_path, tokenizer_files["sentencepiece"])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=match):
        gguf_import.import_gguf(tmp_path / "m.gguf", out, mesh=sharding.create_mesh())
    assert _no_output(out)


# --- command line and llama.cpp ----------------------------------------------------------


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


@pytest.mark.parametrize("model", ["untied-bpe"], indirect=True)
def test_command_line_writes_and_reads_gguf(model, tmp_path):
    out = tmp_path / "m.gguf"
    cmd = [sys.executable, "-m", "convert.to_gguf", f"--model_dir={model}", f"--out={out}"]
    done = subprocess.run(
        [*cmd, "--type=q8_0"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout and "writing GGUF: " in done.stderr
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 2 and again.stderr.startswith("error: ") and "overwrite" in again.stderr
    )
    back = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert.hf_to_orbax",
            f"--gguf={out}",
            f"--out_dir={tmp_path / 'b'}",
            "--mesh=fsdp=2",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert back.returncode == 0, back.stderr[-3000:]
    assert ModelDir.open(tmp_path / "b").config == ModelDir.open(model).config


def test_llama_cpp_generates_what_llama_jax_generates(tmp_path, tokenizer_files):
    llama_cpp = pytest.importorskip("llama_cpp")

    source = _converted(tmp_path, tokenizer_files["bpe"], rope_scaling=LLAMA3_ROPE)
    path = gguf_export.export_gguf(source, tmp_path / "m.gguf", kind="f32")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_threads=2, verbose=False, type_k=0, type_v=0
    )
    tokenizer = model_dir.load_tokenizer(source)
    prompt = tokenizer.encode(TEXT)
    assert len(prompt) > 16, "past the original context, where the llama3 factors matter"
    assert llm.tokenize(TEXT.encode(), add_bos=True) == prompt
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        theirs.append(int(token))
        if len(theirs) == 16:
            break
    model, _ = model_dir.load_model(source)
    ours = generate.generate(
        model, [prompt], max_new_tokens=16, sampling=generate.Sampling(), eos_ids=()
    )
    assert theirs == [int(t) for t in np.asarray(ours[0])]
