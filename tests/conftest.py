"""Test set-up: 8 fake CPU devices (set before JAX is imported) and tiny HF models."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compiler (libtpu) compiles steps ahead of time for TPU topologies on this CPU;
# pytest workers load it side by side, which its process lockfile would refuse.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The shape annotations at the model's face (llama_jax/nn/signatures.py) are checked.
os.environ.setdefault("LLAMA_JAX_TYPECHECK", "1")
# Many tests (and the processes they start) compile the same tiny train and decode
# steps; a shared on-disk cache compiles each once. Reads and writes take a file lock
# (the cache has a size limit), so pytest workers and subprocesses share it safely.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llama_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
