r"""Tokenize, shuffle and pack a corpus once into a token store that training reads by row.

  python -m launch.prepare_data --inputs='gs://bucket/c4/*.jsonl.zst' \
      --tokenizer=/ckpt/llama3.1-8b --seq_len=8192 --out_dir=gs://bucket/c4-llama3-8192

--inputs takes files, directories and globs, local or gs://, comma-separated: JSON Lines (also
.gz / .zst) and Parquet with the text in --field, plain text (documents separated by blank
lines; a directory of .txt files is one document per file), and Hugging Face `datasets`
save_to_disk directories. Records without the field are counted and skipped (--strict refuses
them). Documents are shuffled across all inputs before packing; the store is the same bytes
for the same inputs, tokenizer and flags whatever --workers is. A rerun of an interrupted or
damaged store keeps the shards that are intact and writes the rest.

Train on it with --config.data.path=STORE (or several: --config.data.sources=A:0.7,B:0.3).
"""

import os
import sys

from absl import app, flags

from launch import common
from llama_jax import data, formats

_INPUTS = flags.DEFINE_list(
    "inputs", None, "Input files, directories or globs, comma-separated.", required=True
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "Model directory, tokenizer.json or tokenizer.model (local or gs://).",
    required=True,
)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Tokens per row (T).")
_OUT = common.out_dir_flag("Output token store directory (local or gs://).")
flags.adopt_module_key_flags(common)
_FIELD = flags.DEFINE_string("field", "text", "JSON key or column that holds the text.")
_FORMAT = flags.DEFINE_enum(
    "format", "auto", ["auto", *data.CORPUS_FORMATS], "Input format (auto: from file names)."
)
_PACK = flags.DEFINE_enum(
    "pack",
    "concat",
    list(data.PACK_MODES),
    "concat: documents run on across rows; best_fit: whole documents into the fullest row "
    "that has room (less cutting, some padding).",
)
_WORKERS = flags.DEFINE_integer(
    "workers", max(1, (os.cpu_count() or 2) - 1), "Tokenizer processes (one thread each)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the document shuffle.")
_STRICT = flags.DEFINE_bool(
    "strict", False, "Refuse a record without the field instead of counting and skipping it."
)
_ROWS_PER_SHARD = flags.DEFINE_integer(
    "rows_per_shard", 0, "Rows in each shard file (0: about 128 MB per shard)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace a token store made from other inputs or settings in --out_dir. It stays readable "
    "until every input has been read and tokenized; then its manifest is removed, the shards "
    "are written, and the new manifest is written last.",
)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logs()
    common.check_list("inputs", _INPUTS.value)
    tokenizer = formats.load_tokenizer(_TOKENIZER.value)
    result = data.prepare_store(
        _INPUTS.value,
        tokenizer,
        _OUT.value,
        seq_len=_SEQ_LEN.value,
        field=_FIELD.value,
        format=_FORMAT.value,
        pack=_PACK.value,
        workers=_WORKERS.value,
        seed=_SEED.value,
        overwrite=_OVERWRITE.value,
        strict=_STRICT.value,
        rows_per_shard=_ROWS_PER_SHARD.value or None,
        log=_say,
    )
    print(f"wrote {_OUT.value} ({result['rows']} rows, {result['tokens']} tokens)")


if __name__ == "__main__":
    common.run(main)
