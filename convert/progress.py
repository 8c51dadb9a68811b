"""A progress line for long conversions: tensors and bytes done, rate and time left.

Printed by process 0 only, to stderr: redrawn in place on a terminal, otherwise one
line at most every few seconds (log files stay short).
"""

from __future__ import annotations

import sys
import time

import jax


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


class Progress:
    def __init__(self, what: str, every_s: float = 5.0):
        self.what = what
        self.total_tensors = 0
        self.total_bytes = 0
        self.tensors = 0
        self.bytes = 0
        self._start = time.perf_counter()
        self._last = 0.0
        self._every = every_s
        self._tty = sys.stderr.isatty()
        self._show = jax.process_index() == 0

    def start(self, total_tensors: int, total_bytes: int) -> None:
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self._start = time.perf_counter()

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        done = self.tensors >= self.total_tensors
        if self._show and (self._tty or done or now - self._last >= self._every):
            self._last = now
            self._print(now, done)

    def _print(self, now: float, done: bool) -> None:
        elapsed = now - self._start
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        line = (
            f"{self.what}: {self.tensors}/{self.total_tensors} tensors, "
            f"{_gb(self.bytes)}/{_gb(self.total_bytes)} GB, {rate / 1e6:.0f} MB/s, "
            + (f"done in {elapsed:.1f} s" if done else f"{left:.0f} s left")
        )
        if self._tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if done else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
