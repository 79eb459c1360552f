"""Progress display for long work (calibration, alpha search, export).

On a terminal it is a tqdm bar that redraws in place. Anywhere else (a log file, CI, ``nohup``,
a pipe) a redrawn bar is either invisible until the end or a wall of carriage returns, so each
step is one plain line instead (``desc: 3/12 layer 3/12: smoothquant (4.1 s)``), flushed as it
happens, so a long export is never silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


class Progress:
    """Progress of ``total`` steps; silent when ``enabled`` is False."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.desc, self.total, self.done, self.status = desc, total, 0, ""
        self.enabled = enabled
        self.lines = enabled and not _is_tty(self.stream)
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and not self.lines:
            self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, status: str) -> None:
        self.status = status
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            status = f" {self.status}" if self.status else ""
            print(f"{self.desc}: {self.done}/{self.total}{status} ({time.perf_counter() - self.t0:.1f} s)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
