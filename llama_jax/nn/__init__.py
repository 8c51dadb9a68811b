"""The model: layers, attention, the transformer block, Llama, generation with a KV cache,
and the losses."""

from llama_jax.nn.attention import resolve_implementation
from llama_jax.nn.block import LORA_TARGETS
from llama_jax.nn.generation import Sampling, check_length, decode, generate, sample_logits
from llama_jax.nn.kernels.int8_matmul import int8_matmul
from llama_jax.nn.layers import LoraConfig, rope_inv_freq
from llama_jax.nn.losses import (
    DistillLossConfig,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_sparse_distill_loss,
    make_eval_step,
    token_loss_sum,
)
from llama_jax.nn.model import Llama, abstract_params, segment_positions

__all__ = [
    "decode",
    "abstract_params",
    "check_length",
    "chunked_cross_entropy",
    "chunked_distill_loss",
    "chunked_sparse_distill_loss",
    "DistillLossConfig",
    "generate",
    "int8_matmul",
    "Llama",
    "LORA_TARGETS",
    "LoraConfig",
    "make_eval_step",
    "resolve_implementation",
    "rope_inv_freq",
    "sample_logits",
    "Sampling",
    "segment_positions",
    "token_loss_sum",
]
