"""llama_jax: LLaMA in JAX/Flax NNX."""

from llama_jax.config import LlamaConfig, get_preset
from llama_jax.formats import load_hf, load_model
from llama_jax.nn import Llama

__all__ = ["Llama", "LlamaConfig", "get_preset", "load_hf", "load_model"]
