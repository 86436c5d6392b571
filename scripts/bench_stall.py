"""How long other requests wait while the daemon commits a big write: the latency of small cached reads
during and after a large sequential write.

    python scripts/bench_stall.py [--gib 3] [--contend] [--dir DIR] [--command 'python /path/launcher.py']

A benchmark, not a test. It makes a store in a fresh directory (under --dir, default $TMPDIR), mounts it,
writes and reads a 64 MiB probe file (so it is cached), then starts a probe that reads 4 KiB of that
file every millisecond and records how long each read took, while `dd` writes --gib GiB to another file
and for two commit intervals after it, with an unlink of that file between them (the periodic commit
brings the written data to disk). Every probe read is served from the cache, so whatever it waits for is
some other request or a commit holding the daemon's event loop. Reported separately for the probes made while the write runs and after it:
median, 99th percentile and maximum latency, and how many probes waited longer than 50 ms.

--contend adds a second process that keeps writing to a file beside the store with O_DIRECT for the whole
measurement, as another tenant of a busy host would: the store's syncs then wait for the disk, and any
sync made on the daemon's event loop shows up as a stall.

--command replaces `python -m reflinkfs.cli` for the daemon (e.g. a launcher that patches the code), to
compare two versions on the same machine. Everything is unmounted and removed at the end, on failure too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from reflinkfs.mounts import is_mounted

MiB = 1 << 20
PROBE_FILE = 64 * MiB
COMMIT_INTERVAL = 5.0
SLOW_MS = 50.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(mnt: str, gib: int) -> tuple[list[float], list[float]]:
    """Probe latencies (seconds) while the write runs, and after it (commits, the unlink)."""
    probe_path = os.path.join(mnt, "probe")
    with open(probe_path, "wb") as f:
        f.write(os.urandom(PROBE_FILE))
    with open(probe_path, "rb") as f:
        while f.read(MiB):
            pass
    latencies: list[tuple[float, float]] = []      # (start time, latency)
    stop = threading.Event()

    def probe() -> None:
        fd = os.open(probe_path, os.O_RDONLY)
        try:
            i = 0
            while not stop.is_set():
                off = (i * 4096 * 257) % PROBE_FILE
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                latencies.append((t0, time.perf_counter() - t0))
                i += 1
                time.sleep(0.001)
        finally:
            os.close(fd)

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={os.path.join(mnt, 'big')}", "bs=1M", f"count={gib * 1024}",
                        "status=none"], check=True)
        t_end = time.perf_counter()
        log(f"wrote {gib} GiB in {t_end - t0:.1f} s; probing through a commit interval, "
            "an unlink of the file and another interval")
        time.sleep(COMMIT_INTERVAL + 0.5)
        os.unlink(os.path.join(mnt, "big"))
        time.sleep(COMMIT_INTERVAL + 0.5)
    finally:
        stop.set()
        th.join()
    return ([lat for t, lat in latencies if t < t_end], [lat for t, lat in latencies if t >= t_end])


def summary(lat: list[float]) -> str:
    if not lat:
        return "no probe completed"
    ms = sorted(x * 1e3 for x in lat)
    slow = sum(1 for x in ms if x > SLOW_MS)
    return (f"{len(ms)} probes: median {ms[len(ms) // 2]:.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.1f} ms, "
            f"max {ms[-1]:.1f} ms, {slow} over {SLOW_MS:.0f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=int, default=3, help="GiB written while probing (default 3)")
    p.add_argument("--dir", default=None, help="where the store and mountpoint go (default $TMPDIR)")
    p.add_argument("--contend", action="store_true", help="keep the disk busy with O_DIRECT writes meanwhile")
    p.add_argument("--command", default=f"{shlex.quote(sys.executable)} -m reflinkfs.cli",
                   help="the reflinkfs command line to mount with")
    a = p.parse_args(argv)
    cmd = shlex.split(a.command)
    work = tempfile.mkdtemp(prefix="reflinkfs-stall-", dir=a.dir)
    store, mnt = os.path.join(work, "store"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    try:
        subprocess.run(cmd + ["mkfs", store], check=True, capture_output=True)
        subprocess.run(cmd + ["mount", store, mnt, "--commit-interval", str(COMMIT_INTERVAL)], check=True)
        contender = None
        if a.contend:
            contender = subprocess.Popen(["sh", "-c", f"while :; do dd if=/dev/zero of={os.path.join(work, 'contend')} "
                                          "bs=1M count=1024 oflag=direct conv=notrunc status=none || exit; done"],
                                          start_new_session=True)
        try:
            during, after = measure(mnt, a.gib)
        finally:
            if contender is not None:                  # the shell and its dd
                os.killpg(contender.pid, signal.SIGKILL)
                contender.wait()
            subprocess.run(cmd + ["umount", mnt], check=False)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.contend:
        print("with a competing O_DIRECT writer on the same disk")
    print(f"cached 4 KiB reads while writing {a.gib} GiB: {summary(during)}")
    print(f"after the write (commits, unlink):   {summary(after)}")
    return 0 if during and after else 1


if __name__ == "__main__":
    sys.exit(main())
