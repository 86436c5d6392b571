"""How long `cp --reflink=auto` of a big file takes inside a reflinkfs mount, and that it moves no data.

    python scripts/bench_clone.py [--small-gib 1] [--big-gib 16] [--runs 7] [--dir DIR] [--profile PREFIX]

A benchmark, not a test. It makes a store in a fresh directory (under --dir, default $TMPDIR), mounts it,
writes a --small-gib file and a --big-gib file of real data (a random 1 MiB chunk repeated; nothing
sparse, so every block is mapped and checksummed), then times `cp --reflink=auto` of each file --runs
times, removing the copy between runs, and reports the median. A clone costs O(extents), not O(bytes), so
the targets are: under 50 ms for 1 GiB, and a big/small time ratio under 2.

Alongside each copy it reads the mount's status counters: the data-file bytes read and written during the
cp (must be 0: the clone shares extents), and the copy_file_range requests the daemon answered (the kernel
hands at most 4 GiB - 4 KiB to one request, so a 16 GiB copy takes 5). A run whose copy does not share
every block with its source is reported as a failure: a fast copy that did not clone proves nothing.

"in-process" is the same clone through os.copy_file_range from this process, without starting cp.

--profile PREFIX: afterwards, for each file, remount with the daemon running in the foreground under
cProfile, repeat the copies, unmount (which writes PREFIX.file-<N>g) and print where the daemon's time
went.

Free space is checked with df first; the files need small+big GiB plus the metadata. Writing 16 GiB
through FUSE takes a few minutes. Everything is unmounted and removed at the end, on failure and on
Ctrl-C/SIGTERM too (--keep leaves the store directory).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from reflinkfs.mounts import is_mounted

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GiB = 1 << 30
MiB = 1 << 20
BS = 4096
CHUNK_WRITE = 8 * MiB
TARGET_SMALL_MS = 50.0
TARGET_RATIO = 2.0
MOUNT_WAIT = 30.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args) -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "reflinkfs")
    base = [script] if os.path.exists(script) else [sys.executable, "-m", "reflinkfs.cli"]
    return base + [str(a) for a in args]


def run(cmd, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


def wait_mounted(mnt: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while not is_mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not mounted after {MOUNT_WAIT:.0f} s")
        time.sleep(0.02)


def unmount(mnt: str, proc: subprocess.Popen | None = None) -> None:
    """`reflinkfs umount`; if that fails, lazy unmount and stop the daemon."""
    if is_mounted(mnt):
        r = run(cli("umount", mnt), check=False, timeout=300)
        if r.returncode != 0:
            log(f"reflinkfs umount failed: {r.stderr.strip()}; forcing")
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
    if proc is not None:
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def status(mnt: str) -> dict:
    return json.loads(os.getxattr(mnt, "user.reflinkfs.status"))


def counters(mnt: str) -> tuple[int, int, int]:
    st = status(mnt)
    return st["data_file"]["bytes_read"], st["data_file"]["bytes_written"], st["clones"]


def extent_map(path: str) -> list:
    info = json.loads(os.getxattr(path, "user.reflinkfs.extents"))
    out, page = info["extents"], info
    while page["next"]:
        page = json.loads(os.getxattr(path, page["next"]))
        out += page["extents"]
    return out


def runs_of(pieces: list) -> list[tuple[int, int, int]]:
    """(lblock, pblock, nblocks) runs, pieces merged where they continue each other: the map reports
    pieces split wherever a refcount run starts, and clones in 4 GiB requests split refcount runs."""
    out: list[list[int]] = []
    for lb, pb, n, _ in pieces:
        if out and out[-1][0] + out[-1][2] == lb and out[-1][1] + out[-1][2] == pb:
            out[-1][2] += n
        else:
            out.append([lb, pb, n])
    return [tuple(r) for r in out]


def avail_bytes(path: str) -> int:
    r = run(["df", "-B1", "--output=avail", path])
    return int(r.stdout.split()[-1])


def write_file(path: str, nbytes: int) -> float:
    """Real data: one random 1 MiB chunk repeated. Returns MB/s.

    The buffer is page-aligned (mmap), as dd's and cp's are: with direct_io the kernel cuts a write into
    requests along the pages of the caller's buffer, so an unaligned buffer (a Python bytes object) makes
    every request start and end inside a block, and the daemon merges those partial blocks."""
    buf = mmap.mmap(-1, CHUNK_WRITE)
    chunk = os.urandom(MiB)
    for off in range(0, CHUNK_WRITE, MiB):
        buf[off:off + MiB] = chunk
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done, last = 0, time.monotonic()
        while done < nbytes:
            n = min(CHUNK_WRITE, nbytes - done)
            done += os.write(fd, memoryview(buf)[:n])
            if time.monotonic() - last > 15:
                log(f"  {path}: {done / GiB:.1f} of {nbytes / GiB:.1f} GiB")
                last = time.monotonic()
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return nbytes / (time.perf_counter() - t0) / 1e6


def commit(mnt: str, src: str) -> None:
    """fsync commits the volume, so a periodic commit does not land inside the next timed copy."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_clones(mnt: str, src: str, runs: int, in_process: bool = True) -> dict:
    dst = src + ".copy"
    want = runs_of(extent_map(src))
    cp_ms, py_ms, moved, requests = [], [], [], []
    for _ in range(runs):
        commit(mnt, src)
        before = counters(mnt)
        t0 = time.perf_counter()
        run(["cp", "--reflink=auto", src, dst])
        cp_ms.append((time.perf_counter() - t0) * 1000)
        after = counters(mnt)
        moved.append((after[0] - before[0], after[1] - before[1]))
        requests.append(after[2] - before[2])
        got = extent_map(dst)
        if runs_of(got) != want or any(rc < 2 for *_, rc in got):
            raise RuntimeError(f"cp --reflink=auto of {src} did not share every extent")
        os.unlink(dst)
    if in_process:
        size = os.stat(src).st_size
        for _ in range(runs):
            commit(mnt, src)
            t0 = time.perf_counter()
            sfd = os.open(src, os.O_RDONLY)
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                done = 0
                while done < size:
                    n = os.copy_file_range(sfd, dfd, size - done)
                    if n == 0:
                        break
                    done += n
            finally:
                os.close(sfd)
                os.close(dfd)
            py_ms.append((time.perf_counter() - t0) * 1000)
            if done != size:
                raise RuntimeError(f"copy_file_range stopped at {done} of {size} bytes")
            os.unlink(dst)
    return {"cp_ms": cp_ms, "py_ms": py_ms, "moved": moved, "requests": requests, "extents": len(want)}


def fmt_runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def profile_daemon(store: str, mnt: str, src: str, runs: int, out: str) -> None:
    log(f"profiling: remounting with the daemon under cProfile ({out})")
    proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", out, "-m", "reflinkfs.cli", "mount",
                             "--foreground", store, mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    try:
        wait_mounted(mnt, proc)
        r = time_clones(mnt, src, runs, in_process=False)
        log(f"  under the profiler: cp --reflink=auto {fmt_runs(r['cp_ms'])} ms")
    finally:
        unmount(mnt, proc)
    import pstats
    # start-up (imports, mount) is in the profile too: show the request handlers and what they call
    print(f"\nwhere the daemon's time went serving {runs} copies of {os.path.basename(src)} "
          f"(reflinkfs functions by cumulative time, then everything by own time):")
    st = pstats.Stats(out)
    st.sort_stats("cumulative").print_stats(r"reflinkfs/(core|fuse|meta)", 25)
    st.sort_stats("tottime").print_stats(15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small-gib", type=int, default=1)
    p.add_argument("--big-gib", type=int, default=16)
    p.add_argument("--runs", type=int, default=7, help="timed copies per file (median reported)")
    p.add_argument("--dir", default=None, help="where to make the store (default: $TMPDIR)")
    p.add_argument("--profile", metavar="PREFIX", help="also profile the daemon serving the copies of each file "
                                                        "(writes PREFIX.file-1g, PREFIX.file-16g)")
    p.add_argument("--keep", action="store_true", help="leave the store directory")
    args = p.parse_args(argv)
    if shutil.which("cp") is None or shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        print("bench_clone: needs GNU cp, fusermount3 and /dev/fuse", file=sys.stderr)
        return 2

    parent = args.dir or tempfile.gettempdir()
    need = (args.small_gib + args.big_gib) * GiB * 11 // 10 + GiB   # data + checksums/metadata + margin
    have = avail_bytes(parent)
    if have < need:
        fits = max(0, (have - GiB) * 10 // 11 // GiB - args.small_gib)
        print(f"bench_clone: {parent} has {have / GiB:.1f} GiB free; {args.small_gib}+{args.big_gib} GiB of "
              f"files need about {need / GiB:.1f} GiB. Use --big-gib {fits} or --dir elsewhere.", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    log(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    base = tempfile.mkdtemp(prefix="reflinkfs-bench-clone-", dir=parent)
    store, mnt = os.path.join(base, "store"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    results = {}
    try:
        run(cli("mkfs", store))
        run(cli("mount", store, mnt), timeout=MOUNT_WAIT)
        wait_mounted(mnt)
        if not status(mnt).get("copy_file_range_handled"):
            raise RuntimeError("the mount does not handle copy_file_range: cp would copy bytes")
        files = {}
        for label, gib in (("small", args.small_gib), ("big", args.big_gib)):
            path = os.path.join(mnt, f"file-{gib}g")
            log(f"writing {gib} GiB to {path}")
            rate = write_file(path, gib * GiB)
            log(f"  {rate:.0f} MB/s")
            files[label] = path
        tiny = os.path.join(mnt, "file-4k")          # what starting cp and creating a file cost alone
        with open(tiny, "wb") as f:
            f.write(os.urandom(BS))
        for label, path in (("tiny", tiny), *files.items()):
            log(f"timing cp --reflink=auto of {os.path.basename(path)}, {args.runs} runs")
            results[label] = time_clones(mnt, path, args.runs)
        if args.profile:
            unmount(mnt)
            for label, path in files.items():
                profile_daemon(store, mnt, path, args.runs, f"{args.profile}.{os.path.basename(path)}")
    finally:
        try:
            unmount(mnt)
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                log(f"kept {base}")

    print(f"\ncp --reflink=auto inside a reflinkfs mount ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"median of {args.runs} runs)")
    med = {}
    r = results["tiny"]
    print(f"  4 KiB: {statistics.median(r['cp_ms']):8.1f} ms   (runs: {fmt_runs(r['cp_ms'])} ms; in-process "
          f"copy_file_range median {statistics.median(r['py_ms']):.1f} ms) - the fixed cost of a cp")
    for label, gib in (("small", args.small_gib), ("big", args.big_gib)):
        r = results[label]
        med[label] = statistics.median(r["cp_ms"])
        moved_r = max(m[0] for m in r["moved"])
        moved_w = max(m[1] for m in r["moved"])
        print(f"  {gib:>3} GiB: {med[label]:8.1f} ms   (runs: {fmt_runs(r['cp_ms'])} ms; in-process "
              f"copy_file_range median {statistics.median(r['py_ms']):.1f} ms)")
        print(f"           extents {r['extents']}, copy_file_range requests per cp {max(r['requests'])}, "
              f"data-file bytes moved per cp: read {moved_r}, written {moved_w}")
    ratio = med["big"] / med["small"]
    print(f"  ratio {args.big_gib} GiB / {args.small_gib} GiB: {ratio:.2f}")
    ok_small = med["small"] < TARGET_SMALL_MS
    ok_ratio = ratio < TARGET_RATIO
    ok_moved = all(m == (0, 0) for r in results.values() for m in r["moved"])
    print(f"  (the kernel hands FUSE at most 4 GiB - 4 KiB per copy_file_range request, so a {args.big_gib} GiB "
          f"cp is {max(results['big']['requests'])} daemon round trips where {args.small_gib} GiB is "
          f"{max(results['small']['requests'])})")
    print(f"  targets: {args.small_gib} GiB under {TARGET_SMALL_MS:.0f} ms: {'yes' if ok_small else 'NO'}; "
          f"ratio under {TARGET_RATIO:.0f}: {'yes' if ok_ratio else 'NO'}; no data moved: {'yes' if ok_moved else 'NO'}")
    return 0 if ok_small and ok_ratio and ok_moved else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_clone: interrupted (everything was unmounted and removed)", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        print(f"bench_clone: {e}", file=sys.stderr)
        sys.exit(1)
