"""How a teacher's top-k token distribution is packed: one position, one record of bytes.

A record holds a position's k most likely token ids, their log-probabilities at
temperature 1, and the log of the mass of all other tokens (the tail). Reading its R
bytes as a little-endian bit string (bit j is bit j % 8 of byte j // 8), it holds, in
order:

    k token ids, `id_bits` = ceil(log2 V) bits each, most likely first
    k log-probability codes, `logprob_bits` bits each
    1 code for the log of the tail mass, `logprob_bits` bits
    zero bits up to a whole byte

A code c below 2**logprob_bits - 1 stands for the log-probability -c * logprob_step;
the largest code stands for "no mass" (-inf). Values are rounded to the nearest code, so
a stored log-probability is within logprob_step / 2 of the teacher's (1/256 nat with the
defaults: 12 bits, a step of 1/128 nat, codes down to about -32 nats). A top-k token
whose log-probability is below the lowest code is stored with "no mass" and its
probability is added to the tail, so the stored distribution stays whole. At k = 64 and
V = 128256 a record is 234 bytes.

`encode` and `decode` are jittable: records are packed on the devices that computed the
logits, and unpacked inside the training step that reads them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import CheckpointError, ConfigError

LOGPROB_BITS = 12
LOGPROB_STEP = 1.0 / 128


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one position's top-k distribution is packed into a record of bytes.

    top_k: k, tokens kept per position (1 <= k <= V).
    vocab_size: V, the teacher's vocabulary.
    logprob_bits, logprob_step: the log-probability quantizer (see the module docstring).
    """

    top_k: int
    vocab_size: int
    logprob_bits: int = LOGPROB_BITS
    logprob_step: float = LOGPROB_STEP

    def __post_init__(self):
        # A field is read as a 32-bit word from its first byte: at most 25 bits fit.
        if not _is_int(self.vocab_size) or not 2 <= self.vocab_size <= 2**24:
            raise ConfigError(f"vocab_size={self.vocab_size!r}; expected an integer in [2, 2**24]")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.vocab_size:
            raise ConfigError(
                f"top_k={self.top_k!r}; expected an integer in [1, {self.vocab_size}] (the "
                "teacher's vocabulary)"
            )
        if not _is_int(self.logprob_bits) or not 2 <= self.logprob_bits <= 24:
            raise ConfigError(f"logprob_bits={self.logprob_bits!r}; expected an integer in [2, 24]")
        if not (isinstance(self.logprob_step, float) and 0 < self.logprob_step < math.inf):
            raise ConfigError(f"logprob_step={self.logprob_step!r}; expected a float > 0")

    @property
    def id_bits(self) -> int:
        return (self.vocab_size - 1).bit_length()

    @property
    def no_mass(self) -> int:
        """The code of a log-probability of -inf."""
        return 2**self.logprob_bits - 1

    @property
    def lowest(self) -> float:
        """The most negative log-probability a code stands for."""
        return -(self.no_mass - 1) * self.logprob_step

    @property
    def record_bits(self) -> int:
        return self.top_k * self.id_bits + (self.top_k + 1) * self.logprob_bits

    @property
    def record_bytes(self) -> int:
        """R: bytes per position."""
        return -(-self.record_bits // 8)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "id_bits": self.id_bits,
            "record_bytes": self.record_bytes,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Layout:
        names = [f.name for f in dataclasses.fields(cls)]
        layout = cls(**{k: d[k] for k in names})
        if layout.to_json() != dict(d):
            raise CheckpointError(f"inconsistent layout {dict(d)}; expected {layout.to_json()}")
        return layout


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def top_k_distribution(logits_BCV: jax.Array, k: int):
    """The k most likely tokens of each position and the log of the rest's mass.

    logits: [B, C, V] (any float dtype; the softmax is taken in float32).
    Returns (ids int32[B, C, k], most likely first; log-probabilities float32[B, C, k];
    log of the tail mass float32[B, C], -inf when k = V). The tail is summed over the
    other tokens themselves rather than taken as 1 - sum p, which would lose a small
    tail to cancellation.
    """
    logits = logits_BCV.astype(jnp.float32)
    top, ids = jax.lax.top_k(logits, k)
    # The maximum comes from its own reduction: XLA:CPU compiles elementwise uses of
    # top_k's values over all of V very slowly.
    peak = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - peak)
    log_z = jnp.log(jnp.sum(e, axis=-1))
    rest = jnp.sum(jnp.put_along_axis(e, ids, 0.0, axis=-1, inplace=False), axis=-1)
    return ids, top - peak - log_z[..., None], jnp.log(rest) - log_z


def _to_bits(values, width: int):
    """uint32[..., n] -> uint8[..., n * width], each value's bits least significant first."""
    bits = (values[..., None] >> jnp.arange(width, dtype=jnp.uint32)) & 1
    return bits.reshape(*values.shape[:-1], -1).astype(jnp.uint8)


def _from_bits(bits, width: int):
    """uint8[..., n * width] -> uint32[..., n]; the inverse of `_to_bits`."""
    bits = bits.reshape(*bits.shape[:-1], -1, width).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _fields(records, first_bit: int, count: int, width: int):
    """uint8[..., R] -> uint32[..., count]: `count` fields of `width` bits packed from
    bit `first_bit` on. Each field is read as the 32-bit word of the bytes under it, so
    nothing larger than [..., count, 4] bytes is made (unpacking into single bits would
    hold 8 bytes for every byte of the records)."""
    starts = first_bit + width * np.arange(count)
    index = starts[:, None] // 8 + np.arange(4)
    # Reading 4 bytes from a field's last byte may run past the record.
    padded = jnp.pad(records, [(0, 0)] * (records.ndim - 1) + [(0, 3)])
    parts = padded[..., index].astype(jnp.uint32)
    word = parts[..., 0] | parts[..., 1] << 8 | parts[..., 2] << 16 | parts[..., 3] << 24
    shift = jnp.asarray(starts % 8, jnp.uint32)
    return (word >> shift) & jnp.uint32(2**width - 1)


def _codes(layout: Layout, logp):
    """float32 log-probabilities -> (uint32 codes, whether each was too small to store)."""
    # Rounding can leave the most likely token a hair above 0.
    scaled = jnp.round(-jnp.minimum(logp, 0.0) / layout.logprob_step)
    dropped = ~(scaled <= layout.no_mass - 1)
    return jnp.where(dropped, layout.no_mass, scaled).astype(jnp.uint32), dropped


def encode(layout: Layout, ids_BTk, logp_BTk, log_tail_BT) -> jax.Array:
    """Packs top-k distributions into records (see the module docstring); jittable.

    ids: int[B, T, k]; logp: float32[B, T, k]; log_tail: float32[B, T]
    (`top_k_distribution`'s outputs). Returns uint8[B, T, R].
    """
    codes, dropped = _codes(layout, logp_BTk)
    # Probability too small to store is not lost: it moves to the tail.
    dropped_mass = jax.nn.logsumexp(jnp.where(dropped, logp_BTk, -jnp.inf), axis=-1)
    tail_codes, _ = _codes(layout, jnp.logaddexp(log_tail_BT, dropped_mass))
    bits = jnp.concatenate(
        [
            _to_bits(ids_BTk.astype(jnp.uint32), layout.id_bits),
            _to_bits(codes, layout.logprob_bits),
            _to_bits(tail_codes[..., None], layout.logprob_bits),
        ],
        axis=-1,
    )
    pad = layout.record_bytes * 8 - layout.record_bits
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    return _from_bits(bits, 8).astype(jnp.uint8)


def decode(layout: Layout, records_BTR):
    """Unpacks records into the teacher's top-k distribution; jittable, and cheap
    enough to run inside a training step.

    records: uint8[B, T, R]. Returns (ids int32[B, T, k]; log-probabilities
    float32[B, T, k], -inf where not stored; log of the tail mass float32[B, T], -inf
    for none), each log-probability within logprob_step / 2 of the teacher's.
    """
    if records_BTR.shape[-1] != layout.record_bytes:
        raise ConfigError(
            f"records of {records_BTR.shape[-1]} bytes; the layout has {layout.record_bytes}"
        )
    records = jnp.asarray(records_BTR)
    k, id_bits, lp_bits = layout.top_k, layout.id_bits, layout.logprob_bits
    ids = _fields(records, 0, k, id_bits).astype(jnp.int32)
    codes = _fields(records, k * id_bits, k + 1, lp_bits)

    def value(c):
        return jnp.where(
            c == layout.no_mass, -jnp.inf, -c.astype(jnp.float32) * layout.logprob_step
        )

    return ids, value(codes[..., :k]), value(codes[..., k])
