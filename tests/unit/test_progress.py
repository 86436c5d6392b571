"""The progress helper draws on a terminal only, throttled, and ends its line; elsewhere it writes nothing."""
from __future__ import annotations

import io

from reflinkfs.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_throttled_on_a_terminal():
    now = [0.0]
    out = Tty()
    p = Progress(1000, "verifying data", stream=out, min_interval=0.5, clock=lambda: now[0])
    for _ in range(10):            # ten steps 0.1 s apart: drawn at 0, 0.5 (and at the end)
        now[0] += 0.1
        p.advance(100)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    draws = text.strip("\n").split("\r")[1:]
    assert draws[0].startswith("verifying data [") and " 10%" in draws[0]
    assert " 60%" in draws[1]
    assert "100%" in draws[-1] and "1000 B of 1000 B" in draws[-1]


def test_nothing_when_not_a_terminal():
    out = io.StringIO()
    with Progress(1000, "verifying data", stream=out) as p:
        p.advance(500)
        p.advance(500)
    assert out.getvalue() == ""
    out = Tty()
    with Progress(1000, "x", stream=out, enabled=False) as p:
        p.advance(1000)
    assert out.getvalue() == ""


def test_units_and_eta():
    now = [0.0]
    out = Tty()
    p = Progress(4 << 30, "verifying data", stream=out, clock=lambda: now[0])
    now[0] = 2.0
    p.advance(1 << 30)
    assert "25%" in out.getvalue() and "1.0 GiB of 4.0 GiB" in out.getvalue() and "512.0 MiB/s" in out.getvalue()
    assert "0:06 left" in out.getvalue()
