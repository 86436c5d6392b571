"""`reflinkfs status --json` and `status --watch` on a real mount."""
from __future__ import annotations

import io
import json
import os

from mountutil import lock_holders, run_cli
from reflinkfs.client import read_attribute
from reflinkfs.watch import watch

MOUNT_OPTIONS = ["--commit-interval", "7", "--cache-size", "32M"]
FOREGROUND = False


def test_status_json_is_complete(fs):
    r = run_cli("status", "--json", fs.mnt)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mountpoint"] == os.path.realpath(fs.mnt) and st["store"] == os.path.realpath(fs.store)
    assert [st["pid"]] == lock_holders(fs.store)
    assert st["commit_interval_s"] == 7.0 and st["cache"]["budget_bytes"] == 32 << 20
    assert st["cache"]["budget_source"] == "fixed (--cache-size)" and st["cache"]["last_shrink"] is None
    assert "fsname=reflinkfs:" + os.path.realpath(fs.store) in st["fuse_options"]
    assert st["uptime_s"] > 0
    for key in ("cache", "data_file", "usage", "commits", "extops", "negotiated", "open_handles"):
        assert key in st, key


def test_watch_sees_a_read(fs, workdir):
    data = os.urandom(1 << 20)
    (workdir / "f").write_bytes(data)
    fd = os.open(fs.mnt, os.O_RDONLY | os.O_DIRECTORY)
    def read_through_daemon():            # a write open: a read-only one of a whole file is the kernel's
        with open(workdir / "f", "r+b") as f:
            return f.read()
    reads = iter([read_through_daemon, read_through_daemon])
    out = io.StringIO()
    try:
        # the "sleep" between two samples is the workload: first read from the data file, then from the cache
        watch(lambda: json.loads(read_attribute(fd, "user.reflinkfs.status")), out, count=2, as_json=True,
              sleep=lambda _: next(reads)())
    finally:
        os.close(fd)
    first, second = [json.loads(x) for x in out.getvalue().splitlines()]
    for line in (first, second):
        assert line["by_op"].get("read", 0) >= 1 and line["bytes_served"] >= len(data)
        assert "getxattr" not in line["by_op"]          # the watcher's own requests are not counted
    assert second["cache_hits"] > 0 and second["cache_hit_rate"] > first["cache_hit_rate"]
    assert second["data_file_bytes_read"] < first["data_file_bytes_read"]


def test_watch_command(fs):
    r = run_cli("status", "--watch", "--count", "2", "--interval", "0.01", "--json", fs.mnt)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and all("requests_per_s" in x and "cache_hit_rate" in x for x in lines)
    r = run_cli("status", "--watch", "--count", "3", "--interval", "0.01", fs.mnt)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and all("req/s" in x for x in r.stdout.splitlines())
