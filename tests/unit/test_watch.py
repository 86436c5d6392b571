"""`status --watch` arithmetic: each line is the difference of two status samples, and the loop stops
after --count lines or on Ctrl-C. Driven with fake samples, a fake clock and no sleeping."""
from __future__ import annotations

import io
import json

from reflinkfs.watch import interval_line, watch


def status(reads=0, getxattr=0, hits=0, misses=0, served=0, disk_read=0, written=0, commits=0) -> dict:
    ops = {"read": {"requests": reads, "deferred": 0, "failed": 0},
           "getxattr": {"requests": getxattr, "deferred": 0, "failed": 0}}
    return {"cache": {"mode": "shared", "hits": hits, "misses": misses, "bytes_served": served},
            "data_file": {"bytes_read": disk_read, "bytes_written": written},
            "extops": {"ops": ops}, "commits": commits}


def test_interval_line():
    a = status(reads=10, getxattr=5, hits=3, misses=1, served=1000, disk_read=500)
    b = status(reads=30, getxattr=7, hits=12, misses=4, served=9000, disk_read=4500, written=8192, commits=1)
    line = interval_line(a, b, 2.0)
    # one of the two getxattr requests is the watcher's own status read
    assert line["by_op"] == {"read": 20, "getxattr": 1}
    assert line["requests"] == 21 and line["requests_per_s"] == 10.5
    assert (line["cache_hits"], line["cache_misses"], line["cache_hit_rate"]) == (9, 3, 0.75)
    assert (line["bytes_served"], line["bytes_served_per_s"]) == (8000, 4000.0)
    assert (line["data_file_bytes_read"], line["data_file_bytes_written"], line["commits"]) == (4000, 8192, 1)
    idle = interval_line(b, status(reads=30, getxattr=8, hits=12, misses=4, served=9000, disk_read=4500,
                                   written=8192, commits=1), 1.0)
    assert idle["requests"] == 0 and idle["by_op"] == {} and idle["cache_hit_rate"] is None


def test_watch_counts_lines_and_uses_the_measured_interval():
    samples = iter([status(reads=0), status(reads=4), status(reads=4), status(reads=10)])
    clock = iter([0.0, 2.0, 3.0, 5.0])
    out = io.StringIO()
    assert watch(lambda: next(samples), out, count=3, as_json=True, sleep=lambda s: None,
                 clock=lambda: next(clock), wall=lambda: 0.0) == 0
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["requests_per_s"] for x in lines] == [2.0, 0.0, 3.0]
    assert [x["seconds"] for x in lines] == [2.0, 1.0, 2.0]


def test_watch_stops_on_ctrl_c_and_text_lines():
    n = {"slept": 0}

    def sleep(_):
        n["slept"] += 1
        if n["slept"] == 3:
            raise KeyboardInterrupt
    samples = iter([status(reads=0), status(reads=5, hits=1, misses=1, served=3 << 20),
                    status(reads=5, hits=1, misses=1, served=3 << 20)])
    out = io.StringIO()
    assert watch(lambda: next(samples), out, interval=1.0, sleep=sleep, clock=iter([0.0, 1.0, 2.0]).__next__,
                 wall=lambda: 0.0) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "5 req/s (read 5)" in lines[0] and "cache hits 50.0%" in lines[0] and "served 3.0 MiB/s" in lines[0]
    assert "0 req/s  cache hits -" in lines[1]
