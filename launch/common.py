"""Flags and start-up shared by the entry points in launch/ and convert/."""

import contextlib
import sys
import time
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


def model_dir_flag(help_text: str) -> flags.FlagHolder:
    """--model_dir, the model directory a command reads (required)."""
    return flags.DEFINE_string("model_dir", None, help_text, required=True)


def out_dir_flag(help_text: str = "Output model directory.", required: bool = True):
    """--out_dir (required unless `required` is False: then the command checks it)."""
    return flags.DEFINE_string("out_dir", None, help_text, required=required)


def mesh_flag(verb: str) -> flags.FlagHolder:
    """--mesh, the one the command `verb`s on."""
    return flags.DEFINE_string(
        "mesh",
        "fsdp=-1",
        f"Mesh to {verb} on, e.g. 'fsdp=-1,tensor=4' (axes: dcn, data, fsdp, tensor; -1 "
        "takes the remaining devices).",
    )


def tokenizer_flag(action: str = "ship", default: str = "the model's own") -> flags.FlagHolder:
    """--tokenizer, a tokenizer directory or file the output carries."""
    return flags.DEFINE_string(
        "tokenizer", None, f"Tokenizer directory or file to {action} (default: {default})."
    )


def overwrite_flag(output: str = "--out_dir") -> flags.FlagHolder:
    """--overwrite: replace an existing output, once the new one is complete."""
    return flags.DEFINE_bool(
        "overwrite", False, f"Replace an existing {output} (only once the new one is complete)."
    )


def model_to_model_flags(
    model_help: str,
    verb: str,
    tokenizer_default: str = "the model's own",
    out_required: bool = True,
) -> ModelToModelFlags:
    """Defines the flags of a command that writes one model directory from another:
    --model_dir, --out_dir (required unless out_required is False: then the command
    checks it), --mesh (the one `verb` runs on), --tokenizer, --overwrite."""
    return ModelToModelFlags(
        model_dir_flag(model_help),
        out_dir_flag(required=out_required),
        mesh_flag(verb),
        tokenizer_flag(default=tokenizer_default),
        overwrite_flag(),
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


class Progress:
    """A progress line on stderr, from process 0 only: redrawn in place on a terminal,
    otherwise one line at most every `every_s` seconds and one at the end (log files stay
    short). Create it after `init_distributed`.

    Fed either way:
      progress(done, total)   counts: `what: done/total (rate/s, elapsed s)`; the library's
                              evaluation calls it after each batch.
      start(total, nbytes), then update(n, nbytes) per n items: tensors of a conversion,
                              `what: done/total tensors, GB done/total, MB/s, time left`.
    """

    def __init__(self, what: str, every_s: float = 5.0):
        import jax

        self.what, self.every_s = what, every_s
        self.total_tensors = self.total_bytes = self.tensors = self.bytes = 0
        self.started = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()
        self.show = jax.process_index() == 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._due(now, done >= total):
            elapsed = now - self.started
            rate = done / max(elapsed, 1e-9)
            self._write(
                f"{self.what}: {done}/{total} ({rate:.1f}/s, {elapsed:.0f} s)", done >= total
            )

    def start(self, total_tensors: int, total_bytes: int) -> None:
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.started = time.perf_counter()

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        done = self.tensors >= self.total_tensors
        if not self._due(now, done):
            return
        elapsed = now - self.started
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        self._write(
            f"{self.what}: {self.tensors}/{self.total_tensors} tensors, "
            f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, "
            + (f"done in {elapsed:.1f} s" if done else f"{left:.0f} s left"),
            done,
        )

    def _due(self, now: float, done: bool) -> bool:
        if self.show and (self.tty or done or now - self.last >= self.every_s):
            self.last = now
            return True
        return False

    def _write(self, line: str, done: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if done else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
