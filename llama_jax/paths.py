"""Paths as the project hands them to Orbax and file systems."""

from __future__ import annotations

import os

from etils import epath


def absolute(path) -> epath.Path:
    """`path` as Orbax needs it: a local path made absolute against the current
    directory (Orbax refuses relative ones); a URI such as gs://... unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))
