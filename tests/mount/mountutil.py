"""Helpers for the tests that drive a real reflinkfs mount through the real command line.

`Mount` runs `reflinkfs mount` (the backgrounding command, or `--foreground` as a child process),
waits for the mount with a deadline, and unmounts with `reflinkfs umount`; if that fails it
lazy-unmounts, then terminates, then kills the daemon, so a failing test never leaves a mount behind.
A watchdog does the same to a mount whose daemon stops answering, so a hung request becomes a failure
instead of a hung test run.

`snapshot(root)` describes a tree (contents, modes, link targets, nlink, xattrs, optionally times) so
that two trees can be compared with one `==`.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reflinkfs.mounts import is_mounted, lock_holders, pid_alive

MOUNT_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 60.0
BAD_LOG_WORDS = ("Traceback", "internal error")


# -- the command line ----------------------------------------------------------------------------
def cli_cmd(*args) -> list[str]:
    """The installed `reflinkfs` script of this interpreter's environment, else `python -m reflinkfs.cli`."""
    script = Path(sys.executable).parent / "reflinkfs"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "reflinkfs.cli"]
    return base + [str(a) for a in args]


def run_cli(*args, timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def mkfs(store, *extra) -> None:
    r = run_cli("mkfs", store, *extra)
    assert r.returncode == 0, f"mkfs failed: {r.stderr}"


def fsck(store) -> subprocess.CompletedProcess:
    return run_cli("fsck", "--verify-data", store)


def assert_fsck_clean(store) -> None:
    r = fsck(store)
    assert r.returncode == 0 and "clean" in r.stderr, f"fsck of {store} is not clean:\n{r.stdout}{r.stderr}"


# -- FUSE availability and mount table -----------------------------------------------------------
def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def need_fuse() -> None:
    reason = fuse_unavailable()
    if reason:
        if os.environ.get("REFLINKFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"REFLINKFS_REQUIRE_FUSE=1 but {reason}")
        pytest.skip(reason)


def wait_for(cond, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def fusermount(mnt, lazy: bool = False, timeout: float = 30.0) -> int:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


# -- a mount ---------------------------------------------------------------------------------------
class Mount:
    """One store mounted on one directory by the real `reflinkfs mount` command.

    foreground=False runs `reflinkfs mount STORE MNT` (it forks the daemon and returns once the mount
    is ready); foreground=True runs `reflinkfs mount --foreground` as our child. Either way the daemon
    logs to `self.log_path`, and `self.pid` is the daemon's pid once mounted.
    """

    def __init__(self, store, mnt, *, foreground: bool = True, options=(), watchdog: float = 600.0):
        self.store = Path(store)
        self.mnt = Path(mnt)
        self.foreground = foreground
        self.options = [str(o) for o in options]
        self.log_path = self.store / "log"
        self.out_path = self.store.parent / f"{self.store.name}.{self.mnt.name}.out"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self._watchdog_s = watchdog
        self._watchdog: threading.Timer | None = None
        self._kill_lock = threading.Lock()
        self.forced = False        # the watchdog or a failed unmount had to force it

    # reading what the daemon said
    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.out_path.exists():
            text += self.out_path.read_text(errors="replace")
        return text

    def bad_log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if any(w in line for w in BAD_LOG_WORDS)]

    def path(self, *parts) -> Path:
        return self.mnt.joinpath(*parts)

    # mounting
    def start(self) -> "Mount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        args = ["mount", self.store, self.mnt, *self.options]
        if self.foreground:
            with open(self.out_path, "ab") as out:
                self.proc = subprocess.Popen(cli_cmd(*args, "--foreground", "--log", self.log_path),
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not is_mounted(self.mnt):
                if self.proc.poll() is not None:
                    pytest.fail(f"`reflinkfs mount --foreground` exited with {self.proc.returncode} "
                                f"before mounting; daemon log:\n{self.log()}")
                if time.monotonic() > deadline:
                    self.force_unmount()
                    pytest.fail(f"no mount on {self.mnt} after {MOUNT_TIMEOUT:.0f} s; daemon log:\n{self.log()}")
                time.sleep(0.01)
            self.pid = self.proc.pid
        else:
            r = run_cli(*args, timeout=MOUNT_TIMEOUT)
            if r.returncode != 0 or not is_mounted(self.mnt):
                holders = lock_holders(self.store)
                if holders or is_mounted(self.mnt):
                    self.pid = holders[0] if holders else None
                    self.force_unmount()
                pytest.fail(f"`reflinkfs mount` exited with {r.returncode}: {r.stderr.strip()}\n"
                            f"daemon log:\n{self.log()}")
            holders = lock_holders(self.store)
            assert len(holders) == 1, f"expected one daemon holding {self.store}/lock, found {holders}"
            self.pid = holders[0]
        self._watchdog = threading.Timer(self._watchdog_s, self._on_watchdog)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def _on_watchdog(self) -> None:
        print(f"watchdog: {self.mnt} still mounted after {self._watchdog_s:.0f} s; forcing it off",
              file=sys.stderr)
        self.force_unmount()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def wait_daemon_exit(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        if self.pid is None:
            return True
        try:
            wait_for(lambda: not pid_alive(self.pid), timeout, "the daemon to exit")
            return True
        except AssertionError:
            return False

    # unmounting
    def unmount(self) -> None:
        """`reflinkfs umount`; on any failure force the mount off, then raise AssertionError."""
        self._stop_watchdog()
        if not is_mounted(self.mnt):
            self.force_unmount()     # the daemon may still be alive
            raise AssertionError(f"{self.mnt} was no longer mounted at unmount time; log:\n{self.log()}")
        try:
            r = run_cli("umount", self.mnt, timeout=UMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.force_unmount()
            raise AssertionError(f"`reflinkfs umount {self.mnt}` hung; log:\n{self.log()}") from None
        if r.returncode != 0 or is_mounted(self.mnt):
            self.force_unmount()
            raise AssertionError(f"`reflinkfs umount {self.mnt}` failed ({r.returncode}): {r.stderr.strip()}")
        if not self.wait_daemon_exit(30):
            self.force_unmount()
            raise AssertionError("the daemon did not exit after unmount")
        if self.proc is not None and self.proc.returncode != 0:
            raise AssertionError(f"`reflinkfs mount --foreground` exited with {self.proc.returncode}; "
                                 f"log:\n{self.log()}")
        assert not lock_holders(self.store), "the store lock is still held after unmount"

    def force_unmount(self) -> None:
        """Lazy-unmount, then terminate, then kill: works on a daemon that no longer answers."""
        self._stop_watchdog()
        with self._kill_lock:
            self.forced = True
            if is_mounted(self.mnt):
                fusermount(self.mnt, lazy=True, timeout=10)
            pids = {p for p in ([self.pid] if self.pid else []) + lock_holders(self.store)}
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, sig)
                if self.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(5)
                alive = [p for p in pids if pid_alive(p)]
                if not alive:
                    break
                with contextlib.suppress(AssertionError):
                    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "the daemon to die")
            if is_mounted(self.mnt):
                fusermount(self.mnt, lazy=True, timeout=30)

    def check_after_unmount(self) -> None:
        """What every test ends with: no traceback or internal error logged, and fsck is clean."""
        bad = self.bad_log_lines()
        assert not bad, "the daemon logged errors:\n" + "\n".join(bad) + "\nfull log:\n" + self.log()
        assert_fsck_clean(self.store)


@contextlib.contextmanager
def mounted(store, mnt, *, check: bool = True, **kw):
    """Mount for the duration of a with-block; always unmounted afterwards, then checked."""
    m = Mount(store, mnt, **kw).start()
    ok = False
    try:
        yield m
        ok = True
    finally:
        if ok:
            m.unmount()
        elif is_mounted(m.mnt) or m.pid:
            try:
                m.unmount()
            except AssertionError:
                pass   # the test's own failure is the one to report
    if check:
        m.check_after_unmount()


class MountFactory:
    """Mounts made during one test; whatever is still mounted at the end is unmounted and checked."""

    def __init__(self, base: Path):
        self.base = base
        self.mounts: list[Mount] = []
        self._n = 0

    def store(self, *mkfs_args) -> Path:
        self._n += 1
        s = self.base / f"store{self._n}"
        mkfs(s, *mkfs_args)
        return s

    def mount(self, store=None, mnt=None, **kw) -> Mount:
        store = store or self.store()
        if mnt is None:
            self._n += 1
            mnt = self.base / f"mnt{self._n}"
        m = Mount(store, mnt, **kw).start()
        self.mounts.append(m)
        return m

    def adopt(self, store, mnt) -> Mount:
        """A mount made outside the factory (e.g. by `run_cli("mount", ...)`), to be unmounted and checked
        like the others: its daemon is the process that holds the store lock."""
        m = Mount(store, mnt, foreground=False)
        holders = lock_holders(m.store)
        assert is_mounted(m.mnt) and len(holders) == 1, f"{mnt}: not mounted by one daemon ({holders})"
        m.pid = holders[0]
        self.mounts.append(m)
        return m

    def finish(self, failed: bool) -> None:
        errors = []
        latest = {m.mnt: m for m in self.mounts}        # a remount on the same directory supersedes
        for m in self.mounts:
            if latest[m.mnt] is not m:
                if m.pid and pid_alive(m.pid):
                    m.force_unmount()
                    errors.append(f"the daemon of an earlier mount on {m.mnt} was still running")
                continue
            if is_mounted(m.mnt) or (m.pid and pid_alive(m.pid)):
                try:
                    m.unmount()
                except AssertionError as e:
                    errors.append(str(e))
        if failed:
            return
        assert not errors, "\n".join(errors)
        for store in dict.fromkeys(m.store for m in self.mounts):
            m = next(x for x in self.mounts if x.store == store)
            m.check_after_unmount()


# -- syscalls Python does not wrap -----------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(ret: int, *paths) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), *[os.fsdecode(p) for p in paths[:1]])
    return ret


def renameat2(old, new, flags: int) -> None:
    f = _libc.renameat2
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _check(f(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags), old)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Times as (sec, nsec); nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    f = _libc.utimensat
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
    _check(f(AT_FDCWD, os.fsencode(path), ts, 0), path)


def getxattr_sized(path, name: str, size: int) -> bytes:
    """getxattr(2) with a caller-chosen buffer size (ERANGE when too small; size 0 asks the length)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    f = _libc.getxattr
    f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    f.restype = ctypes.c_ssize_t
    n = _check(f(os.fsencode(path), name.encode(), buf if size else None, size), path)
    return buf.raw[:n] if size else b"\0" * n


def listxattr_sized(path, size: int) -> int:
    f = _libc.listxattr
    f.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    f.restype = ctypes.c_ssize_t
    buf = ctypes.create_string_buffer(max(size, 1))
    return _check(f(os.fsencode(path), buf if size else None, size), path)


# -- comparing trees -------------------------------------------------------------------------------
def user_xattrs(path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names) if n.startswith("user.")}


def snapshot(root, *, times: bool = False, exact: bool = False, replace: tuple[bytes, bytes] | None = None,
             skip=()) -> dict:
    """relative path -> what a test may compare: type and permission bits, nlink, owner, file size and
    contents, link targets, device numbers, user xattrs; with `times` also atime, mtime and ctime in ns;
    with `exact` (one filesystem before and after, e.g. a remount) also inode numbers, allocated blocks
    and directory sizes. Plus the groups of hard-linked paths.

    `replace=(old, new)` rewrites bytes in contents and link targets, for trees that embed their path.
    `skip` is a set of relative paths whose contents are not compared (only their presence).
    """
    root = Path(root)
    out: dict = {}
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            e: dict = {"mode": stat.filemode(st.st_mode), "nlink": st.st_nlink}
            if stat.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                if rel not in skip:
                    data = p.read_bytes()
                    assert len(data) == st.st_size, f"{p}: read {len(data)} bytes, stat says {st.st_size}"
                    if replace:
                        data = data.replace(*replace)
                        e["size"] = len(data)
                    e["data"] = data
                by_ino.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                t = os.fsencode(os.readlink(p))
                e["target"] = t.replace(*replace) if replace else t
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if stat.S_ISDIR(st.st_mode):
                e["entries"] = len(dirnames) + len(filenames)
            e["uid"], e["gid"] = st.st_uid, st.st_gid
            e["xattrs"] = user_xattrs(p)
            if times:
                e["mtime_ns"] = st.st_mtime_ns
                e["atime_ns"] = st.st_atime_ns
                e["ctime_ns"] = st.st_ctime_ns
            if exact:
                e["ino"] = st.st_ino
                e["blocks"] = st.st_blocks
                e["st_size"] = st.st_size
            out[rel] = e
    out["<hardlinks>"] = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return out


def diff_snapshots(a: dict, b: dict) -> str:
    """A short readable description of how two snapshots differ ('' when equal)."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            lines.append(f"only in second: {k}")
        elif k not in b:
            lines.append(f"only in first: {k}")
        elif a[k] != b[k]:
            if isinstance(a[k], dict):
                for f in sorted(set(a[k]) | set(b[k])):
                    va, vb = a[k].get(f), b[k].get(f)
                    if va != vb:
                        sa, sb = repr(va), repr(vb)
                        lines.append(f"{k}: {f}: {sa[:120]} != {sb[:120]}")
            else:
                lines.append(f"{k}: {a[k]!r} != {b[k]!r}")
    return "\n".join(lines[:60])
