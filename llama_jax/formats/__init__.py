"""Models on disk: model directories of every kind (Hugging Face, converted, training runs,
LoRA runs) behind one handle, writing them atomically, directory-to-directory transforms,
the Hugging Face and GGUF formats, run checkpoints' layout and fingerprints."""

from llama_jax.formats.dir_writer import handed_out, write_model_dir
from llama_jax.formats.fingerprint import config_digest, fingerprint_mismatch
from llama_jax.formats.gguf.read import import_gguf
from llama_jax.formats.gguf.write import export_gguf
from llama_jax.formats.hf.safetensors_file import open_safetensors_dir, parse_size
from llama_jax.formats.lora_dir import check_lora_base
from llama_jax.formats.model_dir import (
    ModelDir,
    load_hf,
    load_model,
    load_tokenizer,
    tokenizer_files,
)
from llama_jax.formats.runs import (
    COMMIT_MARKER,
    META,
    STATE,
    latest_meta,
    latest_step_dir,
    step_damage,
)
from llama_jax.formats.structured_dir import (
    calibration_source,
    check_source,
    load_or_prune,
    structured_prune_dir,
)
from llama_jax.formats.transforms import (
    convert_hf,
    export_hf,
    merge_lora_dir,
    prune_dir,
    quantize_dir,
)

__all__ = [
    "COMMIT_MARKER",
    "META",
    "STATE",
    "ModelDir",
    "calibration_source",
    "check_lora_base",
    "check_source",
    "config_digest",
    "convert_hf",
    "export_gguf",
    "export_hf",
    "fingerprint_mismatch",
    "handed_out",
    "import_gguf",
    "latest_meta",
    "latest_step_dir",
    "load_hf",
    "load_model",
    "load_or_prune",
    "load_tokenizer",
    "merge_lora_dir",
    "open_safetensors_dir",
    "parse_size",
    "prune_dir",
    "quantize_dir",
    "step_damage",
    "structured_prune_dir",
    "tokenizer_files",
    "write_model_dir",
]
