"""Training-run checkpoints (an Orbax CheckpointManager wrapper) and preemption handling.

A run keeps its checkpoints in `<workdir>/checkpoints/<step>/`, each holding two items:
`state/` (a pytree of arrays: parameters, optimizer state with pruning masks, step; Orbax
`StandardSave`) and `meta/` (a JSON dict: data-iterator state, config, teacher
fingerprint; Orbax `JsonSave`). Restoring takes abstract arrays carrying shardings, so a
checkpoint saved on one mesh restores onto any other.

What Orbax 0.12 does with unfinished saves, and what this module adds:

- On local disks a save is written to `<step>.orbax-checkpoint-tmp/` and renamed when
  complete, after `commit_success.txt` is written into it; Orbax never lists a tmp
  directory as a step (on GCS it writes in place and lists only directories that hold
  `commit_success.txt`). It does not delete leftover tmp directories unless asked to; a
  later save of the same step replaces its tmp directory.
- On local disks Orbax lists *any* directory named like a step, marker or not, so a
  partly copied or hand-made `<step>/` would count. Here a step counts only with its
  `commit_success.txt`.
- Files damaged after the commit (deleted, truncated) are found only when read; a
  restore of the latest step that fails this way warns and falls back to the previous
  step.
- When a save fails, Orbax raises before it prunes old steps, so the previous complete
  step survives.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from llama_jax.errors import CheckpointError, ConfigError, first_line
from llama_jax.formats import COMMIT_MARKER, META, STATE, step_damage
from llama_jax.paths import absolute


def _path_str(path) -> str:
    """A key path as 'a/b/0', the same for dicts, sequences and attributes."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


class Checkpointer:
    """Saves and restores a training run's checkpoints in `directory`.

    Args:
      directory: the run's checkpoint directory, `<workdir>/checkpoints`. Nothing is
        written to it until the first save.
      save_every: `save` writes a checkpoint when `step % save_every == 0` (or forced).
      keep: how many of the most recent checkpoints to keep; older ones are deleted only
        after a newer save has completed.
      async_save: write in a background thread; `save` returns once the arrays are
        copied to host memory.

    All processes of a multi-host run must make the same calls in the same order.
    """

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ConfigError(f"save_every={save_every}; expected a positive number of steps")
        if keep < 1:
            raise ConfigError(f"keep={keep}; expected at least 1 checkpoint to keep")
        self.directory = absolute(directory)
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                # The directory is created by the first save, so a restore writes nothing.
                create=False,
                enable_async_checkpointing=async_save,
            ),
        )
        self._pending: int | None = None
        # Steps a restore found damaged; the next save moves them aside (see `save`).
        self._damaged: set[int] = set()

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _committed(self, step: int) -> bool:
        return (self._step_dir(step) / COMMIT_MARKER).exists()

    def all_steps(self) -> list[int]:
        """The steps with a complete (committed) checkpoint, ascending."""
        return sorted(s for s in self._manager.all_steps() if self._committed(s))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves `state` (a pytree of jax.Arrays) and `meta` (a JSON dict) as `step`.

        Saves when `step % save_every == 0` or `force`, and returns whether it did. An
        error from the previous asynchronous save is raised here (as `CheckpointError`).
        An existing complete checkpoint for `step` is never overwritten; an incomplete
        one, and those a restore found damaged, are renamed to `<step>.damaged` so the
        run can save past them without losing them.
        """
        if step < 0:
            raise ConfigError(f"step={step}; expected a non-negative step")
        if not force and step % self.save_every:
            return False
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta for step {step} is not JSON-serialisable: {e}") from e
        self.wait()
        self._set_aside(step)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}
                ),
                force=True,
            )
        except Exception as e:
            self._manager.reload()
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed: {first_line(e)}"
            ) from e
        self._pending = step
        return True

    def _set_aside(self, step: int) -> None:
        """Renames damaged step directories, and an incomplete one at `step`, out of
        Orbax's way: it lists them as steps, refuses to save over them, and counts them
        when pruning."""
        target = self._step_dir(step)
        if target.exists() and self._committed(step) and step not in self._damaged:
            raise CheckpointError(
                f"step {step} already has a complete checkpoint in {self.directory}; "
                "refusing to overwrite it (delete it to train past it again)"
            )
        doomed = set(self._damaged)
        if target.exists():
            doomed.add(step)
        if doomed and jax.process_index() == 0:
            for s in sorted(doomed):
                source = self._step_dir(s)
                if not source.exists():
                    continue
                aside = self.directory / f"{s}.damaged"
                n = 0
                while aside.exists():
                    n += 1
                    aside = self.directory / f"{s}.damaged.{n}"
                logging.warning("moving damaged checkpoint %s aside to %s", source, aside)
                source.rename(aside)
        if jax.process_count() > 1:
            # Every process must see the renames before Orbax lists the steps again.
            multihost_utils.sync_global_devices("llama_jax.checkpoint.set_aside")
        self._damaged.clear()
        if doomed:
            self._manager.reload()

    def wait(self) -> None:
        """Blocks until an asynchronous save has finished; raises CheckpointError if it
        failed (the checkpoints saved before it are left as they were)."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            # Orbax dropped the steps it meant to prune from its list; read them again.
            self._manager.reload()
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed: {first_line(e)}; "
                f"complete steps: {self.all_steps()}"
            ) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores `(step, state, meta)`.

        Args:
          abstract_state: the state's structure as `jax.ShapeDtypeStruct` leaves with
            `sharding=` set; arrays are restored directly into those shardings, whatever
            mesh saved them, and cast to the given dtypes.
          step: the step to restore; None means the latest one. For None, a damaged
            latest step is skipped with a warning and the previous one tried.

        Raises:
          CheckpointError: no complete checkpoint (naming the directory), the requested
            step is missing or damaged, or the checkpoint's tree or shapes differ from
            `abstract_state`.
        """
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
                raise CheckpointError(
                    f"abstract_state leaf {_path_str(path)!r} is {leaf!r}; expected a "
                    "jax.ShapeDtypeStruct with sharding= set"
                )
        self.wait()
        self._manager.reload()
        on_disk = sorted(self._manager.all_steps(), reverse=True)
        if step is not None and step not in on_disk:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"complete steps: {self.all_steps()}"
            )
        damaged = []
        for s in [step] if step is not None else on_disk:
            reason = self._damage(s, abstract_state)
            if reason is None:
                try:
                    restored = self._manager.restore(
                        s,
                        args=ocp.args.Composite(
                            **{
                                STATE: ocp.args.StandardRestore(abstract_state),
                                META: ocp.args.JsonRestore(),
                            }
                        ),
                    )
                except Exception as e:
                    reason = f"reading it failed with {first_line(e)}"
                else:
                    return s, restored[STATE], restored[META]
            self._damaged.add(s)
            if step is not None:
                raise CheckpointError(
                    f"checkpoint step {s} in {self.directory} is damaged: {reason}"
                )
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); falling back to the previous step",
                s,
                self.directory,
                reason,
            )
            damaged.append(f"step {s}: {reason}")
        raise CheckpointError(
            f"no complete checkpoint in {self.directory}"
            + (f"; damaged: {'; '.join(damaged)}" if damaged else "")
        )

    def _damage(self, step: int, abstract_state: Any) -> str | None:
        """Why `step` cannot be restored, or None if it looks complete. A checkpoint
        whose tree or shapes differ from `abstract_state` is the caller's mismatch, not
        damage, and raises instead of falling back to an older step."""
        reason = step_damage(self._step_dir(step))
        if reason is not None:
            return reason
        try:
            saved = self._manager.item_metadata(step)[STATE].tree
        except Exception as e:
            return f"reading its metadata failed with {first_line(e)}"
        saved_shapes, wanted = _shapes(saved), _shapes(abstract_state)
        if saved_shapes != wanted:
            problems = [f"missing {k}" for k in sorted(wanted.keys() - saved_shapes.keys())]
            problems += [f"unexpected {k}" for k in sorted(saved_shapes.keys() - wanted.keys())]
            problems += [
                f"{k} has shape {saved_shapes[k]}, expected {wanted[k]}"
                for k in sorted(wanted.keys() & saved_shapes.keys())
                if saved_shapes[k] != wanted[k]
            ]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the state to "
                f"restore: {'; '.join(problems[:10])}"
                + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
            )
        return None


class PreemptionWatch:
    """Turns SIGTERM (a scheduler's preemption notice) into a flag the training loop
    polls, so it can save a checkpoint and exit cleanly.

    The handler only sets the flag. Use as a context manager, or call `close()`: the
    previous handler is put back then. Create it in the main thread (Python delivers
    signals only there).

    Multi-host: the notice may reach only some processes, and all must stop at the same
    step (saving is collective). `should_stop(step)` therefore all-gathers the flags and
    stops everywhere if any process got the notice; every process must call it at the
    same steps, and because the gather waits for the devices, only every `check_every`
    steps. The handler replaces a SIGTERM handler installed outside Python, such as JAX's
    preemption service (`multihost_utils.reached_preemption_sync_point`), for the
    watch's lifetime; that one is not restored by `close()` (SIGTERM's default is).
    """

    def __init__(self, *, check_every: int = 1, signum: int = signal.SIGTERM):
        if check_every < 1:
            raise ConfigError(f"check_every={check_every}; expected a positive number of steps")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatch must be created in the main thread")
        self._check_every = check_every
        self._signum = signum
        self._requested = False
        self._closed = False
        self._previous = signal.getsignal(signum)
        if self._previous is None:
            logging.warning(
                "signal %d has a handler installed outside Python; the preemption watch "
                "replaces it and restores the default handler on close",
                signum,
            )
        signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self._requested = True

    @property
    def requested(self) -> bool:
        """Whether this process received the signal."""
        return self._requested

    def should_stop(self, step: int) -> bool:
        """Whether the run should save and stop now; the same answer on every process."""
        if jax.process_count() == 1:
            return self._requested
        if step % self._check_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self._requested))
        return bool(np.any(flags))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        previous = signal.SIG_DFL if self._previous is None else self._previous
        signal.signal(self._signum, previous)

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
