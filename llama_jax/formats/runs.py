"""A training run on disk: `<workdir>/checkpoints/<step>/`, each step holding a `state/`
item (parameters, optimizer state, step) and a `meta/` item (a JSON dict), complete once
Orbax's commit marker is in it; which step is the latest intact one."""

from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from llama_jax.errors import CheckpointError, first_line
from llama_jax.paths import absolute

STATE = "state"
META = "meta"
# The file Orbax writes into a step directory just before it finalizes it.
COMMIT_MARKER = "commit_success.txt"


def step_damage(step_dir) -> str | None:
    """Why the checkpoint in the step directory `step_dir` is incomplete (no commit
    marker, a missing item), or None if it has all its parts."""
    step_dir = absolute(step_dir)
    if not (step_dir / COMMIT_MARKER).exists():
        return f"{step_dir / COMMIT_MARKER} is missing: the save never finished"
    for item in (STATE, META):
        if not (step_dir / item).is_dir():
            return f"its {item}/ directory is missing"
    return None


def latest_intact_step(directory) -> int:
    """The latest step in a run's checkpoint directory whose checkpoint has all its
    parts (`step_damage`) and readable state metadata. A damaged later step is skipped
    with a warning, as `Checkpointer.restore` does; raises CheckpointError when no step
    is left."""
    directory = absolute(directory)
    steps = sorted(
        (int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.is_dir()
        else (),
        reverse=True,
    )
    damaged = []
    for step in steps:
        reason = step_damage(directory / str(step))
        if reason is None:
            try:
                ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / STATE)
            except Exception as e:
                reason = f"reading its metadata failed with {first_line(e)}"
            else:
                return step
        if (directory / str(step) / COMMIT_MARKER).exists():
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); falling back to the previous step",
                step,
                directory,
                reason,
            )
            damaged.append(f"step {step}: {reason}")
    raise CheckpointError(
        f"{directory} holds no complete checkpoint"
        + (f"; damaged: {'; '.join(damaged)}" if damaged else "")
    )


def latest_step_dir(run) -> epath.Path:
    """The latest intact step directory of the run at `run` (or `run` itself when it
    is a step directory)."""
    run = absolute(run)
    if (run / STATE).is_dir():
        return run
    return run / "checkpoints" / str(latest_intact_step(run / "checkpoints"))


def read_meta(step_dir) -> dict[str, Any]:
    """The `meta` item (a JSON dict: data position, config, model, teacher, LoRA) of a
    step directory."""
    step_dir = absolute(step_dir)
    meta_dir = step_dir / META
    files = list(meta_dir.iterdir()) if meta_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{step_dir} has no {META}/ item")
    try:
        return json.loads(files[0].read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{files[0]}: expected a JSON object ({e})") from e


def latest_meta(run) -> dict[str, Any]:
    """The `meta` item of the run's latest intact step."""
    return read_meta(latest_step_dir(run))
