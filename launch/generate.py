r"""Generate completions from a model directory.

  python -m launch.generate --model_dir=DIR --prompt="Once upon a time" \
      --max_new_tokens=64 --temperature=0
  python -m launch.generate --model_dir=DIR --prompt_file=few_shot.txt --max_new_tokens=32

--prompt may be repeated; a --prompt_file holds one prompt (e.g. a few-shot prompt) as
plain text. Completions are printed one per prompt, in order.
"""

import os
import sys

from absl import app, flags

from launch import common

_MODEL_DIR = flags.DEFINE_string(
    "model_dir",
    None,
    "Model directory: converted (convert.hf_to_orbax), Hugging Face, or a training run.",
    required=True,
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
_PROMPT_FILE = flags.DEFINE_string(
    "prompt_file", None, "A plain-text file holding one prompt (e.g. few-shot examples)."
)
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 64, "Tokens to generate per prompt.", lower_bound=1
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "Sample from the k most likely tokens (0: off).", lower_bound=0
)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Compute and parameter dtype."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer directory or file (default: the model directory's own)."
)
_ADD_BOS = flags.DEFINE_bool(
    "add_bos", None, "Start each prompt with BOS (default: as the tokenizer config says)."
)


def _read_prompt_file(path: str) -> str:
    from llama_jax.errors import DataError

    if os.path.isdir(path):
        raise DataError(f"--prompt_file={path} is a directory, expected a text file")
    if not os.path.isfile(path):
        raise DataError(f"--prompt_file={path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(
            f"--prompt_file={path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
            f"offset {e.start})"
        ) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prompts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
        prompts.append(_read_prompt_file(_PROMPT_FILE.value))
    if not prompts:
        raise app.UsageError("give at least one --prompt or a --prompt_file")
    if not 0.0 < _TOP_P.value <= 1.0:
        raise app.UsageError(f"--top_p={_TOP_P.value} must be in (0, 1]")

    import jax.numpy as jnp

    from llama_jax import formats, nn
    from llama_jax.errors import ConfigError

    # Everything about the prompts is checked before the weights are read.
    model_dir = formats.ModelDir.open(_MODEL_DIR.value)
    tokenizer = formats.load_tokenizer(_TOKENIZER.value or model_dir)
    config = model_dir.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"tokenizer vocabulary {tokenizer.vocab_size} ({tokenizer.path}) exceeds the "
            f"model's {config.vocab_size}"
        )
    ids = tokenizer.encode_batch(prompts, add_bos=_ADD_BOS.value)
    for i, p in enumerate(ids):
        if not p:
            raise ConfigError(f"prompt {i} encodes to no tokens; give text or --add_bos")
    nn.check_length(max(map(len, ids)), _MAX_NEW.value, config.max_position_embeddings)
    top_k = _TOP_K.value
    if top_k > config.vocab_size:
        sys.stderr.write(
            f"note: --top_k={top_k} is more than the vocabulary ({config.vocab_size} tokens); "
            f"sampling from all {config.vocab_size}\n"
        )
        top_k = config.vocab_size
    model = model_dir.load(dtype=jnp.dtype(_DTYPE.value))
    eos_ids = tokenizer.eos_ids or config.eos_token_ids
    outputs = nn.generate(
        model,
        ids,
        max_new_tokens=_MAX_NEW.value,
        sampling=nn.Sampling(_TEMPERATURE.value, top_k, _TOP_P.value),
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_id,
        seed=_SEED.value,
    )
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"=== completion {i}")
        # A model's vocabulary may be padded past the tokenizer's; such ids have no text.
        text = tokenizer.decode([t for t in out if t < tokenizer.vocab_size])
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    common.run(main)
