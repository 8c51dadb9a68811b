"""Flags and start-up shared by the entry points in launch/ and convert/."""

import os
import sys
import time
import traceback
from typing import NamedTuple

from absl import app, flags, logging

from llama_jax.errors import ConfigError, NonFiniteLossError

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for multi-host runs off TPU."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
VERBOSE = flags.DEFINE_bool(
    "verbose", False, "With a refused input, print its traceback too (as LLAMA_JAX_DEBUG=1 does)."
)


# Set once this process has joined (or found it has no) multi-host run.
_JOINED: list[bool] = []


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


def check_list(name: str, items: list[str]) -> None:
    """Refuses an empty item in a comma-separated flag (`--model_dir=A,` or `A,,B`)."""
    for i, item in enumerate(items):
        if not item.strip():
            raise ConfigError(
                f"--{name}={','.join(items)}: item {i + 1} is empty; remove the extra comma"
            )


def init_distributed() -> None:
    """Joins a multi-host run; must run before anything touches a JAX backend.

    On TPU pods (and clusters JAX recognises, e.g. SLURM) JAX finds its peers itself;
    elsewhere the three flags above name them, and without them the run is a single
    process. Later calls in the same process do nothing.
    """
    import jax

    if _JOINED:
        return
    _JOINED.append(True)
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


def run(main) -> None:
    """`app.run(main)`, flag parsing included, inside the error boundary every command
    shares. A refused input is one `error: <message>` line on stderr and exit status 2:
    a llama_jax error or any ValueError (a config, mesh, checkpoint or data problem), a
    non-finite loss, a path the file system refuses, an unknown config field (with its
    suggestion). With --verbose or LLAMA_JAX_DEBUG=1 its traceback comes first. Any other
    exception is a bug and keeps its traceback."""

    def guarded(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            # A flag combination the command refuses: one line, like any other refusal.
            raise ConfigError(str(e)) from e

    try:
        app.run(guarded)
    except Exception as e:  # noqa: BLE001 - sorted into refusals and bugs below
        message = refusal(e)
        if message is None:
            raise
        if _debug():
            traceback.print_exc()
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def refusal(error: BaseException) -> str | None:
    """The one-line message of an input the command refuses, or None for a bug."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    if _is_config_field_error(error):
        return _config_field_message(error)
    if isinstance(error, ValueError | NonFiniteLossError):
        return " ".join(str(error).split("\n")).strip() or type(error).__name__
    return None


def _is_config_field_error(error: BaseException) -> bool:
    """An ml_collections override of a field the config does not have."""
    if not isinstance(error, AttributeError | KeyError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any("ml_collections" in frame.filename for frame in frames)


def _config_field_message(error: BaseException) -> str:
    """'--config.train.stepz: the config has no field 'stepz'; did you mean "steps"...'."""
    inner = error
    while isinstance(inner.args[0] if inner.args else None, BaseException):
        inner = inner.args[0]
    text = str(inner.args[0]) if inner.args else str(inner)
    first, _, rest = text.partition("\n")
    field = first.strip().strip("'\"")
    flag = next(
        (a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and field in a),
        f"a --config field {field!r}",
    )
    hint = rest.strip()
    hint = f"; {hint[0].lower()}{hint[1:]}" if hint else ""
    return f"{flag}: the config has no field {field!r}{hint}"


def _debug() -> bool:
    if os.environ.get("LLAMA_JAX_DEBUG", "") not in ("", "0"):
        return True
    if VERBOSE.present or flags.FLAGS.is_parsed():
        return bool(flags.FLAGS.is_parsed() and VERBOSE.value)
    return "--verbose" in sys.argv[1:]


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
