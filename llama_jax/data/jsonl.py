"""JSON Lines files: one JSON object per line, blank lines skipped, a bad line named by
its file and number. Training data, task files and prompt files all read through here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from etils import epath

from llama_jax.errors import DataError


def check_text(text: str, where: str) -> str:
    """`text` itself, once it is known to be text: JSON can escape an unpaired UTF-16
    surrogate (\\ud800-\\udfff), which decodes to a string no encoder or tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: the text holds an unpaired surrogate escape ({text[e.start]!r} at "
            f"character {e.start}), which is not Unicode text; remove or replace it"
        ) from None
    return text


def records(path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of `path`."""
    path = epath.Path(path)
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{line_no}: not a valid JSON line ({e})") from e
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}"
                )
            yield line_no, record


def strings(path, field: str) -> list[tuple[int, str]]:
    """(line number, the `field` string) of every line; a line without one is named."""
    out = []
    for line_no, record in records(path):
        text = record.get(field)
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{line_no}: expected a JSON object with a string {field!r}; got keys "
                f"{sorted(record)}"
            )
        out.append((line_no, check_text(text, f"{path}:{line_no}")))
    return out
