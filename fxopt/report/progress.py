"""A one-line progress bar on stderr (``\\r``-redrawn) while a report runs; silent when stderr is not a terminal."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    """``step(message)`` advances one step and redraws ``[####....] 3/12 12s message``; ``close()`` clears it."""

    def __init__(self, total: int, prefix: str = "", stream: TextIO | None = None, enabled: bool | None = None):
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

    def step(self, message: str = "") -> None:
        self.done = min(self.total, self.done + 1)
        self.show(message)

    def show(self, message: str = "") -> None:
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

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class NullProgress(Progress):
    def __init__(self):
        super().__init__(1, enabled=False)
