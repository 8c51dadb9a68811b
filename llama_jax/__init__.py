"""llama_jax: LLaMA in JAX/Flax NNX."""

from llama_jax.config import LlamaConfig, get_preset
from llama_jax.model import Llama
from llama_jax.model_dir import load_hf, load_model

__all__ = ["Llama", "LlamaConfig", "get_preset", "load_hf", "load_model"]
