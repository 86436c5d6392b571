"""A progress bar for long commands, on stderr, only when stderr is a terminal.

    with Progress(total_bytes, "verifying data", unit="B") as p:
        for ...:
            p.advance(n)

On a terminal it redraws one line in place (carriage return), at most every `min_interval` seconds and
once at the end, then ends the line; anywhere else (a pipe, a file, a test) it writes nothing at all,
so what a command prints stays what scripts parse. The clock and the stream are parameters for tests.
"""
from __future__ import annotations

import sys
import time

WIDTH = 30


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f}{unit and ' ' + unit}"
    for name, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {name}"
    return f"{n:.0f} B"


class Progress:
    def __init__(self, total: int, what: str, *, unit: str = "B", stream=None, enabled: bool | None = None,
                 min_interval: float = 0.2, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else enabled
        self.total, self.what, self.unit = max(0, total), what, unit
        self.done = 0
        self.min_interval = min_interval
        self.clock = clock
        self.started = clock()
        self._drawn_at: float | None = None
        self._width = 0

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        if self._drawn_at is None or now - self._drawn_at >= self.min_interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * WIDTH)
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = ""
        if 0 < rate and self.done < self.total:
            left = int((self.total - self.done) / rate)
            eta = f"  {left // 60}:{left % 60:02} left"
        speed = f"  {_amount(rate, self.unit)}/s" if elapsed > 0 else ""
        text = (f"{self.what} [{'#' * filled}{'.' * (WIDTH - filled)}] {100 * frac:3.0f}%  "
                f"{_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}{speed}{eta}")
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)
        self._drawn_at = now

    def close(self) -> None:
        if self.enabled and self._drawn_at is not None:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_at = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
