"""A one-line progress bar on stderr (``\\r``-redrawn) while a report runs, shown on a terminal only.

Steps that take seconds (torch.compile's first call, a build) also print a line when they start and one with their
time when they end (:meth:`Progress.slow`), on a terminal or not: a log of a run shows where the time went. None
of it goes into the report's JSON.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from typing import Iterator, TextIO


class Progress:
    """``step(message)`` advances one step and redraws ``[####....] 3/12 12s message``; ``close()`` clears it."""

    def __init__(self, total: int, prefix: str = "", stream: TextIO | None = None, enabled: bool | None = None,
                 lines: bool = True):
        self.lines = lines  # the start/end lines of slow steps (:meth:`slow`)
        self.total = max(1, total)
        self.done = 0
        self.prefix = prefix
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.start = time.perf_counter()
        self._width = 0
        self._message = ""

    def step(self, message: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        self.show(message)

    def show(self, message: str = "") -> None:
        self._message = message
        if not self.enabled:
            return
        columns = shutil.get_terminal_size((100, 20)).columns
        bar = 20
        filled = bar * self.done // self.total
        line = (f"{self.prefix}[{'#' * filled}{'.' * (bar - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:4.0f}s {message}")
        line = line[:max(10, columns - 1)]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own on the stream (the bar, if shown, is redrawn below it)."""
        if not self.lines:
            return
        shown = self.enabled and self._width
        if shown:
            self.stream.write("\r" + " " * self._width + "\r")
        self.stream.write(f"{self.prefix}{text}\n")
        self.stream.flush()
        if shown:
            self._width = 0
            self.show(self._message)

    @contextlib.contextmanager
    def slow(self, message: str) -> Iterator[None]:
        """Around a step that may take seconds: ``MESSAGE...`` now, ``MESSAGE: done in 12.3 s`` (or ``failed
        after``) when it ends."""
        self.line(f"{message}...")
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.line(f"{message}: failed after {time.perf_counter() - t0:.1f} s")
            raise
        self.line(f"{message}: done in {time.perf_counter() - t0:.1f} s")

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class NullProgress(Progress):
    """No bar, no lines (``run_report`` called from code)."""

    def __init__(self):
        super().__init__(1, enabled=False, lines=False)
