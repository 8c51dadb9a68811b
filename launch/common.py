"""Flags and start-up shared by the entry points in launch/ and convert/."""

import contextlib
import sys
from typing import NamedTuple

from absl import app, flags, logging

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-host runs off TPU."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class ModelToModelFlags(NamedTuple):
    model_dir: flags.FlagHolder
    out_dir: flags.FlagHolder
    mesh: flags.FlagHolder
    tokenizer: flags.FlagHolder
    overwrite: flags.FlagHolder


def model_to_model_flags(
    model_help: str, verb: str, tokenizer_default: str = "the model's own"
) -> ModelToModelFlags:
    """Defines the flags of a command that writes one model directory from another:
    --model_dir, --out_dir, --mesh (the one `verb` runs on), --tokenizer, --overwrite."""
    return ModelToModelFlags(
        flags.DEFINE_string("model_dir", None, model_help, required=True),
        flags.DEFINE_string("out_dir", None, "Output model directory.", required=True),
        flags.DEFINE_string("mesh", "fsdp=-1", f"Mesh to {verb} on, e.g. 'fsdp=-1,tensor=4'."),
        flags.DEFINE_string(
            "tokenizer",
            None,
            f"Tokenizer directory or file to ship (default: {tokenizer_default}).",
        ),
        flags.DEFINE_bool(
            "overwrite", False, "Replace an existing --out_dir (only once the new one is complete)."
        ),
    )


def init_distributed() -> None:
    """Joins a multi-host run; must run before anything touches a JAX backend.

    On TPU pods (and clusters JAX recognises, e.g. SLURM) JAX finds its peers itself;
    elsewhere the three flags above name them, and without them the run is a single
    process.
    """
    import jax

    if COORDINATOR.value or NUM_PROCESSES.value:
        if None in (COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value):
            raise app.UsageError(
                "multi-host needs all of --coordinator_address, --num_processes, --process_id"
            )
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
        return
    try:
        jax.distributed.initialize()
    except ValueError as e:
        logging.info("single-process run (%s)", e)


@contextlib.contextmanager
def clear_errors():
    """Reports a bad input (a ValueError from the library: config, mesh, checkpoint or
    data) as one line on stderr and exit status 2, instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def quiet_logs() -> None:
    """Shows warnings and errors only (Orbax logs every file it writes at INFO), unless
    --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
