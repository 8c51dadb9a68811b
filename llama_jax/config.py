"""Model architecture: a frozen `LlamaConfig`, named presets, and HF config.json <-> config.

The dimension alphabet (WORKSPACE.md): V vocab, D model width, N query heads,
K key/value heads, H head dim, F MLP hidden, L layers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from etils import epath

from llama_jax.errors import ConfigError

ROPE_TYPES = ("default", "linear", "llama3")
HF_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is 'linear' or 'llama3' (LLaMA 3.1 scaling).

    `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`
    are read only by 'llama3'.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(
                f"rope_type={self.rope_type!r} is not supported; expected one of {ROPE_TYPES}"
            )
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor={self.factor} must be > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
                f"low_freq_factor ({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a LLaMA-family model; nothing about how it runs."""

    vocab_size: int  # V
    embed_dim: int  # D
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "embed_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be > 0")
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        else:
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def q_per_kv(self) -> int:
        """G: query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embedding and LM head counted once each when untied)."""
        d, h, f = self.embed_dim, self.head_dim, self.mlp_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads) + d
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    # --- project JSON (config.json of a converted model) ---

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown LlamaConfig fields {unknown}; expected a subset of {sorted(known)}"
            )
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # --- Hugging Face config.json ---

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Reads a transformers LlamaConfig dict (4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters` layout). Anything this model would get wrong is an error."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type is not None and model_type != "llama":
            raise ConfigError(
                f"model_type={model_type!r} is not supported; expected 'llama' "
                f"(architectures {list(HF_ARCHITECTURES)})"
            )
        unsupported = [a for a in archs if a not in HF_ARCHITECTURES]
        if unsupported:
            raise ConfigError(
                f"architectures={archs} is not supported; expected {list(HF_ARCHITECTURES)}"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}; a LLaMA config needs it")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported; expected 'silu'")
        d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if d % n:
                raise ConfigError(f"hidden_size={d} is not divisible by num_attention_heads={n}")
            head_dim = d // n

        theta, scaling = _read_hf_rope(hf)
        # transformers' LlamaConfig defaults: bos 1, eos 2 when the keys are absent.
        eos = hf.get("eos_token_id", 2)
        eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            embed_dim=d,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=n,
            num_kv_heads=int(hf.get("num_key_value_heads") or n),
            head_dim=int(head_dim),
            mlp_dim=int(hf["intermediate_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers config.json dict. Writes both `rope_theta`/`rope_scaling` (4.x)
        and `rope_parameters` (5.x) so either major version reads it."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {
                "rope_type": self.rope_scaling.rope_type,
                "factor": self.rope_scaling.factor,
            }
            if self.rope_scaling.rope_type == "llama3":
                rope_scaling |= {
                    "low_freq_factor": self.rope_scaling.low_freq_factor,
                    "high_freq_factor": self.rope_scaling.high_freq_factor,
                    "original_max_position_embeddings": (
                        self.rope_scaling.original_max_position_embeddings
                    ),
                }
            rope_parameters = rope_scaling | {"rope_theta": self.rope_theta}
        eos = list(self.eos_token_ids)
        return {
            "architectures": list(HF_ARCHITECTURES),
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.mlp_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }

    @classmethod
    def from_json_file(cls, path) -> LlamaConfig:
        """Reads either a project config.json or a Hugging Face config.json (local, or any
        file system etils.epath reads, such as gs://)."""
        try:
            d = json.loads(epath.Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a {type(d).__name__}; expected a JSON object")
        if "hidden_size" in d or "model_type" in d or "architectures" in d:
            try:
                return cls.from_hf(d)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from e
        return cls.from_dict(d)


def _read_hf_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either config.json layout; unknown RoPE types raise."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, Mapping) and params:
        if "rope_type" not in params and any(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(
                f"per-layer-type rope_parameters {sorted(params)} are not supported; "
                "expected one rope_parameters dict"
            )
        theta = params.get("rope_theta", theta)
        scaling = params
    if theta is None:
        theta = 10000.0
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope_type={rope_type!r} is not supported; expected one of {ROPE_TYPES} "
            "(yarn, dynamic and longrope would silently give a different model)"
        )
    if "factor" not in scaling:
        raise ConfigError(f"rope scaling {dict(scaling)} has no 'factor'")
    kwargs: dict[str, Any] = {"rope_type": rope_type, "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in scaling:
                raise ConfigError(f"llama3 rope scaling {dict(scaling)} has no {key!r}")
        kwargs |= {
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    return float(theta), RopeScaling(**kwargs)


_LLAMA2 = dict(
    vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5
)
_LLAMA3 = dict(
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_ids=(128001,),
)
_LLAMA31 = _LLAMA3 | dict(
    max_position_embeddings=131072,
    eos_token_ids=(128001, 128008, 128009),
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
)
_LLAMA32 = _LLAMA31 | dict(
    tie_word_embeddings=True, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
)


def _arch(d, layers, heads, kv_heads, mlp, head_dim=None):
    return dict(
        embed_dim=d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim or d // heads,
        mlp_dim=mlp,
    )


PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(**_LLAMA2, **_arch(4096, 32, 32, 32, 11008)),
    "llama2-13b": LlamaConfig(**_LLAMA2, **_arch(5120, 40, 40, 40, 13824)),
    "llama2-70b": LlamaConfig(**_LLAMA2, **_arch(8192, 80, 64, 8, 28672)),
    "llama3-8b": LlamaConfig(
        **_LLAMA3, max_position_embeddings=8192, **_arch(4096, 32, 32, 8, 14336)
    ),
    "llama3-70b": LlamaConfig(
        **_LLAMA3, max_position_embeddings=8192, **_arch(8192, 80, 64, 8, 28672)
    ),
    "llama3.1-8b": LlamaConfig(**_LLAMA31, **_arch(4096, 32, 32, 8, 14336)),
    "llama3.1-70b": LlamaConfig(**_LLAMA31, **_arch(8192, 80, 64, 8, 28672)),
    "llama3.1-405b": LlamaConfig(**_LLAMA31, **_arch(16384, 126, 128, 8, 53248)),
    "llama3.2-1b": LlamaConfig(**_LLAMA32, **_arch(2048, 16, 32, 8, 8192, head_dim=64)),
    "llama3.2-3b": LlamaConfig(**_LLAMA32, **_arch(3072, 28, 24, 8, 8192, head_dim=128)),
    # Prime-ish sizes so shape bugs show: G = 3, H != D / N, llama3 RoPE scaling.
    "tiny": LlamaConfig(
        vocab_size=263,
        embed_dim=48,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        head_dim=10,
        mlp_dim=94,
        rope_theta=10000.0,
        rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 32),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
    ),
}


def get_preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
