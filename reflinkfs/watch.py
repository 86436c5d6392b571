"""`reflinkfs status --watch MNT`: one line per interval of what the daemon did, like vmstat or iostat.

Each line is the difference between two reads of the status attribute (user.reflinkfs.status):
requests answered (extops' per-operation counts; the watcher's own status request is not counted), the
cache's hits and misses in that interval and its hit rate, the bytes the daemon served to reads, and the
bytes it read from and wrote to its data file. Reads the kernel answers from its own page cache (mapped
files, --kernel-cache) never reach the daemon and are not seen here.

It stops on Ctrl-C, or after --count lines. `watch()` takes the sampler and the sleep as arguments, so
tests can drive it without waiting.
"""
from __future__ import annotations

import json
import sys
import time

TOP_OPS = 3          # the busiest operations named on a text line


def _requests(st: dict) -> dict[str, int]:
    return {op: c["requests"] for op, c in st.get("extops", {}).get("ops", {}).items()}


def interval_line(before: dict, after: dict, seconds: float) -> dict:
    """What happened between two status samples, `seconds` apart."""
    b_ops, a_ops = _requests(before), _requests(after)
    by_op = {op: a_ops[op] - b_ops.get(op, 0) for op in a_ops if a_ops[op] - b_ops.get(op, 0)}
    if by_op.get("getxattr"):               # the status read that ends this interval is the watcher's own
        by_op["getxattr"] -= 1
        if not by_op["getxattr"]:
            del by_op["getxattr"]
    requests = sum(by_op.values())
    bc, ac = before.get("cache", {}), after.get("cache", {})
    hits = ac.get("hits", 0) - bc.get("hits", 0)
    misses = ac.get("misses", 0) - bc.get("misses", 0)
    served = ac.get("bytes_served", 0) - bc.get("bytes_served", 0)
    bd, ad = before.get("data_file", {}), after.get("data_file", {})
    disk_read = ad.get("bytes_read", 0) - bd.get("bytes_read", 0)
    disk_written = ad.get("bytes_written", 0) - bd.get("bytes_written", 0)
    per_s = (lambda n: n / seconds) if seconds > 0 else (lambda n: 0.0)
    return {"seconds": seconds, "requests": requests, "requests_per_s": per_s(requests), "by_op": by_op,
            "cache_mode": ac.get("mode"), "cache_hits": hits, "cache_misses": misses,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            "bytes_served": served, "bytes_served_per_s": per_s(served),
            "data_file_bytes_read": disk_read, "data_file_bytes_written": disk_written,
            "commits": after.get("commits", 0) - before.get("commits", 0)}


def _rate(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}/s"
    return f"{n:.0f} B/s"


def text(line: dict, now: float) -> str:
    busiest = sorted(line["by_op"].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_OPS]
    ops = ", ".join(f"{op} {n}" for op, n in busiest)
    rate = line["cache_hit_rate"]
    hit = "-" if rate is None else f"{100 * rate:.1f}%"
    s = line["seconds"] or 1.0
    return (f"{time.strftime('%H:%M:%S', time.localtime(now))} {line['requests_per_s']:8.0f} req/s"
            f"{f' ({ops})' if ops else ''}  cache hits {hit}  served {_rate(line['bytes_served_per_s'])}  "
            f"data file read {_rate(line['data_file_bytes_read'] / s)} "
            f"written {_rate(line['data_file_bytes_written'] / s)}")


def watch(sample, out, *, interval: float = 1.0, count: int | None = None, as_json: bool = False,
          sleep=time.sleep, clock=time.monotonic, wall=time.time) -> int:
    """Print one line per interval: `sample()` gives a status dict; stops after `count` lines or Ctrl-C."""
    prev, t_prev = sample(), clock()
    n = 0
    try:
        while count is None or n < count:
            sleep(interval)
            cur, t = sample(), clock()
            line = interval_line(prev, cur, t - t_prev)
            if as_json:
                out.write(json.dumps({"time": wall(), **line}) + "\n")
            else:
                out.write(text(line, wall()) + "\n")
            out.flush()
            prev, t_prev = cur, t
            n += 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_watch(args, sample) -> int:
    return watch(sample, sys.stdout, interval=args.interval, count=args.count, as_json=args.json)
