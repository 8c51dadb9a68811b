"""Paths as the project hands them to Orbax and file systems, and the checks every
command makes of its outputs before it reads anything: of the right kind, writable, and
apart from its inputs."""

from __future__ import annotations

import os

from etils import epath

from llama_jax.errors import ConfigError


def absolute(path) -> epath.Path:
    """`path` as Orbax needs it: a local path made absolute against the current
    directory (Orbax refuses relative ones); a URI such as gs://... unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _compared(path) -> str:
    """`path` as outputs and inputs are compared: a URI with no trailing slash, a local
    path made absolute with its symlinks resolved."""
    text = str(path)
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(os.path.abspath(text))


def _inside(inner: str, outer: str) -> bool:
    return inner.startswith(outer.rstrip("/") + "/")


def check_apart(output, inputs, *, flag: str, may_contain: bool = False) -> None:
    """Refuses an output that is one of `inputs` (paths; empty ones are skipped), lies
    inside one, or contains one, after resolving symlinks: writing it would destroy or
    change what the command reads. flag: the output's name in the message. may_contain: an
    output directory that only adds its own files may hold an input."""
    out = _compared(output)
    for given in inputs:
        if not given:
            continue
        source = _compared(given)
        if out == source:
            why = "is the input"
        elif _inside(out, source):
            why = "is inside the input"
        elif _inside(source, out) and not may_contain:
            why = "contains the input"
        else:
            continue
        raise ConfigError(f"{flag}={output} {why} {given}; write the output elsewhere")


def check_output_dir(out_dir, *, flag: str = "--out_dir") -> epath.Path:
    """Refuses an output directory that cannot be written as one: an existing file, or a
    missing parent that cannot be created (a parent that is a file). Returns it
    absolute."""
    out_dir = absolute(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{flag}={out_dir} is a file, expected a directory")
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag}={out_dir}: {parent} is a file, expected a directory")
    if "://" not in str(parent) and parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag}={out_dir}: {parent} is not writable")
    return out_dir


def check_output_file(out, *, flag: str = "--out") -> epath.Path:
    """Refuses an output file that cannot be written as one: an existing directory, a
    missing parent directory, or one that is not writable. Returns it absolute."""
    out = absolute(out)
    if out.is_dir():
        raise ConfigError(f"{flag}={out} is a directory, expected a file")
    if not out.parent.exists():
        raise ConfigError(f"{flag}={out}: its directory {out.parent} does not exist")
    if not out.parent.is_dir():
        raise ConfigError(f"{flag}={out}: {out.parent} is a file, expected a directory")
    if "://" not in str(out) and not os.access(out.parent, os.W_OK):
        raise ConfigError(f"{flag}={out}: {out.parent} is not writable")
    return out
