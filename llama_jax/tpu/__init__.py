"""TPU slices: Cloud TPU topologies, and steps compiled ahead of time with their HBM per
chip."""

from llama_jax.tpu.aot import compile_config
from llama_jax.tpu.topology import local_target, tpu_target

__all__ = ["compile_config", "local_target", "tpu_target"]
