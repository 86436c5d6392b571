"""Measuring memory the way the memory report and tests/mount/test_memory.py need it.

Total memory of a way of serving files = the serving process's RSS (the reflinkfs daemon; none for a
kernel filesystem) + the page cache attributable to it: the pages cached for the files read, and for the
store's data file (or a loop device's backing file). Never RSS alone: a cache can hide in the kernel.

Page cache of one file is asked of the kernel for an open descriptor: `cachestat(2)` (Linux >= 6.5), or
`mincore(2)` on a private read-only mapping where cachestat is missing. This is what `fincore(1)` reports,
with one difference that matters here: fincore opens the file itself, and opening a FUSE file whose
daemon does not set keep_cache *invalidates* that inode's page cache, so fincore on a reflinkfs mount
file always says 0, whatever was cached a moment before. The page cache of mount files is therefore
measured on the descriptors that did the reading, held open until measured (`page_cache_bytes(fd)`);
files on ordinary filesystems can be measured by path (`file_page_cache(path)`).

The mapper (`Mapper`) is a child process that maps files MAP_PRIVATE and touches every page, so that
mapped reads (executables, shared libraries) can be measured, and reports the page cache of the files
it has mapped and its own RSS. It must be the only opener of those files while it holds them (see
above: another open would invalidate the pages it mapped).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time

from reflinkfs.mounts import is_mounted, lock_holders, pid_alive

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYS_CACHESTAT = 451          # the same number on every architecture with the unified syscall table


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                               "nr_recently_evicted")]


_have_cachestat: bool | None = None


def _cachestat(fd: int) -> int | None:
    global _have_cachestat
    if _have_cachestat is False:
        return None
    rng, cs = _CachestatRange(0, 0), _Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) == 0:
        _have_cachestat = True
        return cs.nr_cache * PAGE
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _have_cachestat = False
        return None
    raise OSError(ctypes.get_errno(), "cachestat failed")


def _mincore(fd: int) -> int:
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    mmap_ = _libc.mmap
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = mmap_(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap for mincore failed")
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(b & 1 for b in vec) * PAGE
    finally:
        _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def page_cache_bytes(fd: int) -> int:
    """Bytes of this open file held in the kernel page cache (without opening it again)."""
    got = _cachestat(fd)
    return _mincore(fd) if got is None else got


def file_page_cache(path) -> int:
    """Page cache of a file on an ordinary filesystem (not a FUSE mount: see the module notes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return page_cache_bytes(fd)
    finally:
        os.close(fd)


def fincore_bytes(path) -> int | None:
    """What util-linux fincore(1) says about a file (None without fincore)."""
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return int(r.stdout.split()[0])


# -- processes and the machine ------------------------------------------------------------------
def proc_memory(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def drop_caches() -> str | None:
    """sync, then drop clean page cache, dentries and inodes. Returns why it could not, or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot drop caches ({e.strerror}; needs root)"
    return None






def reflinkfs_cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "reflinkfs")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "reflinkfs.cli"]


def mount_status(mnt) -> dict:
    return json.loads(os.getxattr(str(mnt), "user.reflinkfs.status"))


def file_info(path) -> dict:
    """`reflinkfs stat --json` of one file: its extents, segment, and whether it is whole."""
    return json.loads(os.getxattr(str(path), "user.reflinkfs.extents"))


class ReflinkfsMount:
    """`reflinkfs mount STORE MNT ARGS...` (the real, backgrounding command) until `stop()`.

    stop() always leaves nothing behind: `reflinkfs umount`, and if that fails, a lazy unmount, then
    SIGTERM and SIGKILL to the daemon."""

    def __init__(self, store, mnt, args=(), timeout: float = 60.0):
        self.store, self.mnt, self.args = str(store), str(mnt), [str(a) for a in args]
        self.timeout = timeout
        self.pid: int | None = None

    def start(self) -> "ReflinkfsMount":
        os.makedirs(self.mnt, exist_ok=True)
        r = subprocess.run(reflinkfs_cli() + ["mount", self.store, self.mnt, *self.args], capture_output=True,
                           text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        holders = lock_holders(self.store)
        self.pid = holders[0] if holders else None
        if r.returncode != 0 or not is_mounted(self.mnt) or self.pid is None:
            self.stop()
            raise RuntimeError(f"reflinkfs mount {self.store} {self.mnt} failed ({r.returncode}): "
                               f"{r.stderr.strip()} (daemon log: {self.store}/log)")
        return self

    def stop(self) -> list[str]:
        """Unmount; return what had to be forced (empty when the clean unmount worked)."""
        forced = []
        if is_mounted(self.mnt):
            try:
                r = subprocess.run(reflinkfs_cli() + ["umount", self.mnt], capture_output=True, text=True,
                                   timeout=180, stdin=subprocess.DEVNULL)
                if r.returncode != 0:
                    forced.append(f"reflinkfs umount failed: {r.stderr.strip()}")
            except subprocess.TimeoutExpired:
                forced.append("reflinkfs umount hung")
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True, timeout=30)
            forced.append("lazy unmount")
        pids = set(lock_holders(self.store))       # only the holder of the store lock is ever signalled
        _wait_gone(pids, 5 if forced else 30)     # after a clean unmount the daemon flushes and exits
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [p for p in pids if pid_alive(p)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                forced.append(f"{signal.Signals(sig).name} to daemon {pid}")
            _wait_gone(pids, 5)
        return forced


def _wait_gone(pids, timeout: float) -> None:
    end = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)


# -- the mapper: mapped reads in a child process ---------------------------------------------------
class Mapper:
    """A child process that maps files MAP_PRIVATE read-only and touches every page of each.

    map(path) -> its report after mapping and touching the file; report() -> {"page_cache": [bytes per
    mapped file], "rss": {VmRSS, RssAnon, RssFile, ...}}. Its RSS is kept apart from the daemon's: the
    file pages it maps are the page-cache pages counted in page_cache, not more memory."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--mapper"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the mapper process exited ({self.proc.poll()})")
        out = json.loads(answer)
        if "error" in out:
            raise RuntimeError(f"mapper: {out['error']}")
        return out

    def map(self, path) -> dict:
        return self._ask("map " + os.fsdecode(path))

    def report(self) -> dict:
        return self._ask("report")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _mapper_main() -> int:
    maps: list[tuple[int, mmap.mmap]] = []

    def report() -> dict:
        return {"page_cache": [page_cache_bytes(fd) for fd, _ in maps], "rss": proc_memory(os.getpid())}

    for line in sys.stdin:
        cmd, _, arg = line.rstrip("\n").partition(" ")
        try:
            if cmd == "map":
                fd = os.open(arg, os.O_RDONLY | os.O_CLOEXEC)
                size = os.fstat(fd).st_size
                m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
                maps.append((fd, m))
                total = 0
                for off in range(0, size, PAGE):          # touch every page: a fault for each
                    total += m[off]
                out = report()
                out["touched_bytes"] = size
            elif cmd == "report":
                out = report()
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except OSError as e:
            out = {"error": f"{cmd} {arg}: {e}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--mapper"]:
    sys.exit(_mapper_main())
