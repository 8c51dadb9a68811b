"""llama_jax: LLaMA in JAX/Flax NNX."""

from llama_jax.config import LlamaConfig, get_preset
from llama_jax.hf import load_hf
from llama_jax.model import Llama

__all__ = ["Llama", "LlamaConfig", "get_preset", "load_hf"]
