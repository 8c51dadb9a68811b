"""A LLaMA in GGUF, llama.cpp's file format: tensor names and layouts, and the config
as GGUF metadata, both ways.

GGUF stores each tensor in the Hugging Face layout ([out, in] for a projection, one
tensor per layer, `hf_keymap`), under llama.cpp's names (`blk.{i}.attn_q.weight`), with
one difference: llama.cpp rotates adjacent pairs of a head's dimensions where
transformers (and this project, `layers.apply_rope`) rotate its two halves, so the rows
of the query and key projections (weights and biases) are reordered head by head
(`to_interleaved`). llama3 RoPE scaling is not a metadata key in llama.cpp but a
`rope_freqs.weight` tensor of H/2 per-frequency divisors (`llama3_factors`).

Beside llama.cpp's keys an exported file carries the exact LlamaConfig as JSON under
`llama_jax.config` (llama.cpp and transformers ignore keys they do not know). The
standard keys stay authoritative: an import uses the stored config only where it
describes the same model as they do, and files from other tools import from the
standard keys alone (`config_from_metadata`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gguf
import numpy as np
from absl import logging

from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.formats.hf import keymap
from llama_jax.formats.hf.layout import hf_shape, hf_to_project, layout_dims, project_to_hf
from llama_jax.nn import rope_inv_freq

ARCH = "llama"
CONFIG_KEY = "llama_jax.config"
ROPE_FREQS = "rope_freqs.weight"
LAYER = "blk.{i}."

# Project parameter path -> GGUF tensor name ("{i}": the layer; the project stacks
# layers along a leading L axis).
TENSOR_NAMES: dict[str, str] = {
    "embed.embedding": "token_embd.weight",
    "final_norm.scale": "output_norm.weight",
    "lm_head.kernel": "output.weight",
    "layers.attn_norm.scale": LAYER + "attn_norm.weight",
    "layers.attn.q_proj.kernel": LAYER + "attn_q.weight",
    "layers.attn.q_proj.bias": LAYER + "attn_q.bias",
    "layers.attn.k_proj.kernel": LAYER + "attn_k.weight",
    "layers.attn.k_proj.bias": LAYER + "attn_k.bias",
    "layers.attn.v_proj.kernel": LAYER + "attn_v.weight",
    "layers.attn.v_proj.bias": LAYER + "attn_v.bias",
    "layers.attn.o_proj.kernel": LAYER + "attn_output.weight",
    "layers.attn.o_proj.bias": LAYER + "attn_output.bias",
    "layers.mlp_norm.scale": LAYER + "ffn_norm.weight",
    "layers.mlp.gate_proj.kernel": LAYER + "ffn_gate.weight",
    "layers.mlp.gate_proj.bias": LAYER + "ffn_gate.bias",
    "layers.mlp.up_proj.kernel": LAYER + "ffn_up.weight",
    "layers.mlp.up_proj.bias": LAYER + "ffn_up.bias",
    "layers.mlp.down_proj.kernel": LAYER + "ffn_down.weight",
    "layers.mlp.down_proj.bias": LAYER + "ffn_down.bias",
}
# Parameters whose rows llama.cpp orders for its RoPE, with the config field counting
# their heads.
_ROTATED = {
    "layers.attn.q_proj.kernel": "num_heads",
    "layers.attn.q_proj.bias": "num_heads",
    "layers.attn.k_proj.kernel": "num_kv_heads",
    "layers.attn.k_proj.bias": "num_kv_heads",
}


def tensor_names(path: str, config: LlamaConfig) -> list[str]:
    """The GGUF tensor name(s) behind one project parameter (one per layer if stacked)."""
    name = TENSOR_NAMES[path]
    return [name.format(i=i) for i in range(config.num_layers)] if "{i}" in name else [name]


def tensor_shape(path: str, config: LlamaConfig) -> tuple[int, ...]:
    """The shape (numpy order: [out, in]) of each GGUF tensor behind `path`."""
    return hf_shape(keymap.PARAMS[path][1], layout_dims(config))


def to_interleaved(x: np.ndarray, heads: int) -> np.ndarray:
    """Rows [(heads H), ...] whose head dims rotate as halves (x_j, x_{j+H/2}) -> rows
    whose head dims rotate as adjacent pairs (x_{2j}, x_{2j+1}), as llama.cpp's LLaMA
    RoPE expects. A new array."""
    h = x.shape[0] // heads
    split = x.reshape(heads, 2, h // 2, *x.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(x.shape)


def from_interleaved(x: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `to_interleaved`."""
    h = x.shape[0] // heads
    pairs = x.reshape(heads, h // 2, 2, *x.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(x.shape)


def to_gguf(path: str, x: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """One layer of project parameter `path` (project layout, e.g. [D, N, H]) -> its GGUF
    tensor ([out, in], numpy order), in x's dtype."""
    _, hf_layout, proj_layout = keymap.PARAMS[path]
    out = project_to_hf(x, hf_layout, proj_layout, layout_dims(config))
    if path in _ROTATED:
        return to_interleaved(out, getattr(config, _ROTATED[path]))
    return np.ascontiguousarray(out)


def from_gguf(path: str, x: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """The inverse of `to_gguf`: a GGUF tensor -> one layer of `path` in project layout
    (possibly a view of x)."""
    _, hf_layout, proj_layout = keymap.PARAMS[path]
    if path in _ROTATED:
        x = from_interleaved(x, getattr(config, _ROTATED[path]))
    return hf_to_project(x, hf_layout, proj_layout, layout_dims(config))


def check_exportable(config: LlamaConfig) -> None:
    """Raises ConfigError for a model llama.cpp's LLaMA loader would run differently."""
    s = config.rope_scaling
    if s is not None and s.rope_type not in ("linear", "llama3"):
        raise ConfigError(
            f"rope_type={s.rope_type!r} has no llama.cpp LLaMA equivalent; expected none, "
            "'linear' or 'llama3'"
        )


# --- RoPE scaling ------------------------------------------------------------------


def llama3_factors(scaling: RopeScaling, rope_theta: float, head_dim: int) -> np.ndarray:
    """float32[H/2]: what llama.cpp divides each RoPE frequency by for llama3 scaling
    (its `rope_freqs` tensor): 1 for wavelengths below original/high_freq_factor,
    `factor` above original/low_freq_factor, and the smooth interpolation between."""
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    old = scaling.original_max_position_embeddings
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    between = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    out = np.where(wavelen > old / scaling.low_freq_factor, scaling.factor, between)
    return np.where(wavelen < old / scaling.high_freq_factor, 1.0, out).astype(np.float32)


def _short(x: float) -> float:
    """The shortest decimal that a float32 metadata value came from (1e-05, not
    9.99999974738e-06)."""
    return float(str(np.float32(x)))


def fit_llama3(factors: np.ndarray, rope_theta: float, head_dim: int) -> RopeScaling | None:
    """The llama3 RopeScaling whose `llama3_factors` are `factors` (a `rope_freqs`
    tensor), or None if every factor is 1. The four parameters are determined up to a
    common scale of (original length, low, high), so low_freq_factor is taken as 1 (as
    in every Meta release); with fewer than two frequencies in the smooth band, high is
    taken as 4 too. Raises ConfigError if no llama3 scaling reproduces the factors."""
    f = np.asarray(factors, np.float64)
    if f.shape != (head_dim // 2,):
        raise ConfigError(f"rope_freqs has shape {list(f.shape)}; expected [{head_dim // 2}]")
    if np.allclose(f, 1.0, rtol=1e-6, atol=0):
        return None
    factor = float(f.max())
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    high = np.isclose(f, 1.0, rtol=1e-6, atol=0)
    low = np.isclose(f, factor, rtol=1e-6, atol=0)
    mid = ~high & ~low
    # In the smooth band 1/f = (1 - s)/factor + s with s = (old/wavelen - lo)/(hi - lo).
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)
        hi_minus_lo = -1 / intercept
        old = round(slope * hi_minus_lo)
        # The fit carries float32 noise: the roundest high factor that reproduces wins.
        candidates = [(old, round(1.0 + old / slope, d)) for d in (1, 2, 3, 4, 6)]
        candidates.append((old, 1.0 + old / slope))
    elif mid.sum() == 1:
        candidates = [(round((3 * s[0] + 1) * wavelen[mid][0]), 4.0)]
    else:
        # Any original length between 4x the longest unscaled wavelength and the
        # shortest scaled one gives these factors; prefer a power of two.
        lo_bound = 4 * wavelen[high].max() if high.any() else 0.0
        hi_bound = wavelen[low].min()
        powers = [2**k for k in range(64) if lo_bound < 2**k < hi_bound]
        candidates = [(powers[0] if powers else math.floor(hi_bound), 4.0)]
    for old, hi in candidates:
        if old < 1:
            continue
        try:
            scaling = RopeScaling("llama3", _short(factor), 1.0, _short(hi), int(old))
        except ConfigError:
            continue
        if np.allclose(llama3_factors(scaling, rope_theta, head_dim), f, rtol=1e-5, atol=0):
            return scaling
    raise ConfigError(
        f"rope_freqs {np.round(f, 4).tolist()[:8]}... is not a llama3 RoPE scaling of theta="
        f"{rope_theta}, head_dim={head_dim}; it cannot be imported"
    )


# --- config -> metadata --------------------------------------------------------------


def write_config(writer: gguf.GGUFWriter, config: LlamaConfig) -> None:
    """Adds the architecture's metadata, as llama.cpp's converter writes it for LLaMA,
    and the exact config under CONFIG_KEY."""
    check_exportable(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    s = config.rope_scaling
    if s is not None and s.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s.factor)
    writer.add_string(CONFIG_KEY, json.dumps(config.to_dict(), sort_keys=True))


def rope_freqs(config: LlamaConfig) -> np.ndarray | None:
    """float32[H/2]: the `rope_freqs.weight` tensor llama.cpp needs for this config
    (llama3 scaling), or None."""
    s = config.rope_scaling
    if s is None or s.rope_type != "llama3":
        return None
    return llama3_factors(s, config.rope_theta, config.head_dim)


# --- metadata -> config --------------------------------------------------------------

Get = Callable[[str], Any]


def _key(name: str) -> str:
    return name.format(arch=ARCH)


def config_from_metadata(
    get: Get,
    tensor_shapes: Mapping[str, Sequence[int]],
    read_rope_freqs: Callable[[], np.ndarray],
    special_ids: Mapping[str, int | None],
    where,
) -> LlamaConfig:
    """The LlamaConfig of a LLaMA GGUF file.

    get(key): a metadata value or None; tensor_shapes: every tensor's numpy-order shape;
    read_rope_freqs(): the rope_freqs tensor as float32; special_ids: 'bos', 'eos',
    'eot', 'eom', 'pad' token ids (or None). The stored CONFIG_KEY config is used where
    it describes the same model as the standard keys; raises CheckpointError for a
    model this project cannot run as llama.cpp does.
    """
    K = gguf.Keys

    def need(key: str) -> Any:
        value = get(_key(key))
        if value is None:
            raise CheckpointError(f"{where}: metadata {_key(key)!r} is missing")
        return value

    experts = get(_key(K.LLM.EXPERT_COUNT))
    if experts:
        raise CheckpointError(
            f"{where}: a mixture-of-experts LLaMA ({experts} experts) is not supported; "
            "llama_jax imports dense LLaMA models"
        )
    d, n = int(need(K.LLM.EMBEDDING_LENGTH)), int(need(K.Attention.HEAD_COUNT))
    head_dim = get(_key(K.Attention.KEY_LENGTH)) or get(_key(K.Rope.DIMENSION_COUNT))
    head_dim = int(head_dim or d // n)
    value_dim = int(get(_key(K.Attention.VALUE_LENGTH)) or head_dim)
    rope_dim = int(get(_key(K.Rope.DIMENSION_COUNT)) or head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
            f"{where}: key_length={head_dim}, value_length={value_dim}, "
            f"rope.dimension_count={rope_dim}; llama_jax needs all three equal (full RoPE)"
        )
    theta = _short(get(_key(K.Rope.FREQ_BASE)) or 10000.0)
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{where}: tensor 'token_embd.weight' is missing")
    vocab = int(tensor_shapes["token_embd.weight"][0])
    scaling = _scaling_from_metadata(get, tensor_shapes, read_rope_freqs, theta, head_dim, where)
    eos = [special_ids.get(k) for k in ("eos", "eot", "eom")]
    eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
    try:
        config = LlamaConfig(
            vocab_size=vocab,
            embed_dim=d,
            num_layers=int(need(K.LLM.BLOCK_COUNT)),
            num_heads=n,
            num_kv_heads=int(get(_key(K.Attention.HEAD_COUNT_KV)) or n),
            head_dim=head_dim,
            mlp_dim=int(need(K.LLM.FEED_FORWARD_LENGTH)),
            rms_norm_eps=_short(get(_key(K.Attention.LAYERNORM_RMS_EPS)) or 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(get(_key(K.LLM.CONTEXT_LENGTH)) or 2048),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            mlp_bias="blk.0.ffn_gate.bias" in tensor_shapes,
            bos_token_id=special_ids.get("bos"),
            eos_token_ids=(eos_ids[0], *sorted(eos_ids[1:])) if eos_ids else (),
            pad_token_id=special_ids.get("pad"),
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the metadata is not a valid LLaMA config ({e})") from e
    return _prefer_stored(get(CONFIG_KEY), config, where)


def _scaling_from_metadata(get, tensor_shapes, read_rope_freqs, theta, head_dim, where):
    K = gguf.Keys
    kind = get(_key(K.Rope.SCALING_TYPE)) or "none"
    if kind not in ("none", "linear"):
        raise CheckpointError(
            f"{where}: rope.scaling.type={kind!r} is not supported; expected 'none' or "
            "'linear' (or llama3 scaling as a rope_freqs tensor)"
        )
    has_freqs = ROPE_FREQS in tensor_shapes
    if kind == "linear":
        if has_freqs:
            raise CheckpointError(f"{where}: both linear RoPE scaling and rope_freqs")
        factor = get(_key(K.Rope.SCALING_FACTOR))
        if not factor:
            raise CheckpointError(f"{where}: linear RoPE scaling without a factor")
        return RopeScaling("linear", _short(factor))
    if not has_freqs:
        return None
    factors = read_rope_freqs()
    stored = _stored(get(CONFIG_KEY), where)
    if stored is not None and stored.rope_scaling is not None:
        s = stored.rope_scaling
        if s.rope_type == "llama3" and np.allclose(
            llama3_factors(s, theta, head_dim), factors, rtol=1e-6, atol=0
        ):
            return s
    try:
        return fit_llama3(factors, theta, head_dim)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _stored(text: str | None, where) -> LlamaConfig | None:
    if text is None:
        return None
    try:
        return LlamaConfig.from_dict(json.loads(text))
    except (ConfigError, TypeError, ValueError) as e:
        logging.warning("%s: ignoring %s, which is not a LlamaConfig (%s)", where, CONFIG_KEY, e)
        return None


def _prefer_stored(text: str | None, derived: LlamaConfig, where) -> LlamaConfig:
    """The stored config if it describes the network the standard keys describe: it
    keeps what they cannot (exact llama3 parameters, every EOS id, the model's own
    BOS / pad ids, the init scale). EOS ids the file names that it lacks are taken from
    the file (a file whose stop token was edited stops where it says)."""
    stored = _stored(text, where)
    if stored is None:
        return derived
    a, b = stored.to_dict(), derived.to_dict()
    a["rms_norm_eps"] = _short(a["rms_norm_eps"])
    ids = ("bos_token_id", "pad_token_id", "eos_token_ids")
    for key in ("initializer_range", "rope_scaling", *ids):
        a.pop(key), b.pop(key)
    if a != b or not np.array_equal(rope_inv_freq(stored), rope_inv_freq(derived)):
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]} or "RoPE frequencies"
        logging.warning(
            "%s: %s disagrees with the file's own metadata (%s); using the metadata",
            where,
            CONFIG_KEY,
            diff,
        )
        return derived
    if not set(derived.eos_token_ids) <= set(stored.eos_token_ids):
        return stored.replace(eos_token_ids=derived.eos_token_ids)
    return stored
