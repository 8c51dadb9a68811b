"""The processes of one multi-process JAX job, started and waited for by a test."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str],
    cwd: str = REPO,
    timeout: float = 240,
) -> list[str]:
    """Starts every command at once, waits for all of them and returns each one's output
    (stdout and stderr together). Output goes through files, not pipes: a process blocked on a
    full pipe would hold the others at their next barrier. Processes still running after
    `timeout` seconds (generous: JAX processes start slowly on a loaded 2-core machine) are
    killed; any that did not exit with 0 fail the test with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="llama_jax_processes_") as logs:
        files = [open(os.path.join(logs, f"{i}.log"), "w+") for i in range(len(commands))]
        procs = [
            subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=f, stderr=subprocess.STDOUT)
            for cmd, f in zip(commands, files, strict=True)
        ]
        deadline = time.monotonic() + timeout
        try:
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        outputs = []
        for f in files:
            f.seek(0)
            outputs.append(f.read())
            f.close()
    for i, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{out[-4000:]}"
    return outputs


def last_json_line(output: str) -> str:
    """The last line of `output` that holds a JSON object (logs may follow it)."""
    return [line for line in output.splitlines() if line.startswith("{")][-1]
