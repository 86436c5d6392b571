"""Real-mount tests of the request layer, reflinkfs.fuse.extops: every request answered by one method,
with its value now, its exception as an errno, or its coroutine later.

Each test mounts tests/mount/_toyfs.py in a child process (which calls extops.load() before importing
pyfuse3) and talks to it with real syscalls; the toy logs every call, and the layer's counts at exit.
"""

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TOYFS = HERE / "_toyfs.py"
SRC_DATA = bytes(range(256)) * 64  # must match _toyfs.SRC_DATA
ATIME_NS = -1_500_000_001          # ... and these _toyfs times
MTIME_NS = 1_234_567_891_234_567_891
KEEP_FROM = 8 << 20                # ... and _toyfs.KEEP_FROM
MOUNT_TIMEOUT = 20.0
WATCHDOG = 120.0  # a hung request is turned into a failure, not a hung test


def _fuse_unavailable():
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def _need_fuse():
    reason = _fuse_unavailable()
    if reason:
        if os.environ.get("REFLINKFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"REFLINKFS_REQUIRE_FUSE=1 but {reason}")
        pytest.skip(reason)


def _fusermount(mnt, lazy=False, timeout=30):
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _is_mounted(mnt):
    # /proc/self/mountinfo never blocks on a wedged FUSE daemon, unlike stat()
    # (so `mnt` must already be a real path: realpath() would lstat it).
    target = os.fsencode(mnt).replace(b"\\", b"\\134").replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class ToyMount:
    def __init__(self, tmp_path, mode):
        self.mnt = tmp_path / f"mnt-{mode}"
        self.mnt.mkdir()
        self.mnt = Path(os.path.realpath(self.mnt))  # resolved before mounting
        self.logfile = tmp_path / f"log-{mode}.jsonl"
        self.outfile = tmp_path / f"out-{mode}.txt"
        self.mode = mode
        self.proc = None
        self._kill_lock = threading.Lock()

    def records(self, event=None):
        if not self.logfile.exists():
            return []
        recs = [json.loads(l) for l in self.logfile.read_text().splitlines() if l.strip()]
        return [r for r in recs if event is None or r["event"] == event]

    def output(self):
        return self.outfile.read_text() if self.outfile.exists() else ""

    def path(self, name):
        return self.mnt / name

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._out = open(self.outfile, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(TOYFS), str(self.mnt), str(self.logfile), self.mode],
            stdout=self._out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                pytest.fail(f"toyfs exited with {self.proc.returncode} before mounting:\n"
                            + self.output())
            if time.monotonic() > deadline:
                pytest.fail("toyfs did not mount within %.0fs:\n%s" % (MOUNT_TIMEOUT, self.output()))
            time.sleep(0.02)

    def kill_hard(self):
        """Lazy-unmount, terminate, kill: aborts requests the daemon never answers.

        fusermount3 itself can block on a wedged daemon, so it gets a short
        timeout and is retried once the daemon is dead.
        """
        with self._kill_lock:
            if _is_mounted(self.mnt):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _fusermount(self.mnt, lazy=True, timeout=5)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            if _is_mounted(self.mnt):  # daemon dead: this cannot block any more
                _fusermount(self.mnt, lazy=True, timeout=30)

    def stop(self, failed):
        clean = False
        try:
            if not failed and _is_mounted(self.mnt):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    clean = _fusermount(self.mnt, timeout=15).returncode == 0
            if clean and self.proc is not None:
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    clean = False
        finally:
            if not clean:
                self.kill_hard()
            self._out.close()
        return clean


@contextlib.contextmanager
def toy_mount(tmp_path, mode):
    _need_fuse()
    m = ToyMount(tmp_path, mode)
    watchdog = threading.Timer(WATCHDOG, m.kill_hard)
    watchdog.daemon = True
    failed = True
    try:
        m.start()
        watchdog.start()
        yield m
        failed = False
    finally:
        watchdog.cancel()
        clean = m.stop(failed)
        assert not _is_mounted(m.mnt), "mount left behind"
    # Only reached when the body succeeded.
    assert clean, "daemon did not shut down cleanly:\n" + m.output()
    assert m.proc.returncode == 0, m.output()
    assert "Traceback" not in m.output(), m.output()


def ops_count(rec, op, what="requests"):
    return rec["counts"]["ops"].get(op, {}).get(what, 0)


def errno_from(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def test_the_session_gets_the_table_and_ops_it_lacks_are_enosys(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        (mounted,) = m.records("mounted")
        assert mounted["interposed"] is True
        assert errno_from(os.mkfifo, m.path("fifo")) == errno.ENOSYS      # the toy serves no mknod
        assert errno_from(os.mkdir, m.path("d")) == errno.ENOSYS          # ... and no mkdir
    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["bad_values"] == 0 and exit_rec["counts"]["dropped"] == 0


def test_copy_file_range_and_deferred_fallocate(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        src, dst = m.path("src"), m.path("dst")
        fd_in, fd_out = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
        try:
            assert os.copy_file_range(fd_in, fd_out, 10000, 100, 0) == 10000
            os.posix_fallocate(fd_out, 0, 50000)                 # deferred: answered by a task
            assert os.fstat(fd_out).st_size == 50000
        finally:
            os.close(fd_in)
            os.close(fd_out)
        data = dst.read_bytes()
        assert data[:10000] == SRC_DATA[100:10100] and data[10000:] == bytes(40000)
        fd = os.open(m.path("drop"), os.O_RDWR)
        try:                                                      # a deferred request never answered
            assert errno_from(os.posix_fallocate, fd, 0, 4096) == errno.EIO
        finally:
            os.close(fd)
    (cfr,) = m.records("copy_file_range")
    assert (cfr["off_in"], cfr["off_out"], cfr["length"], cfr["flags"]) == (100, 0, 10000, 0)
    assert cfr["fh_in"] != cfr["fh_out"] and {cfr["fh_in"], cfr["fh_out"]} <= {r["fh"] for r in m.records("release")}
    assert [r["op"] for r in m.records("spawn")] == ["fallocate", "fallocate"]
    assert [r["op"] for r in m.records("second_reply_refused")] == ["fallocate"]
    assert [r["op"] for r in m.records("dropped")] == ["fallocate"]
    assert not m.records("write"), "the layer copied and allocated: the kernel wrote nothing itself"
    (exit_rec,) = m.records("exit")
    assert ops_count(exit_rec, "copy_file_range") == 1
    assert ops_count(exit_rec, "fallocate") == 2 and ops_count(exit_rec, "fallocate", "deferred") == 2
    assert exit_rec["counts"]["dropped"] == 1


def test_reads_reply_an_iovec_and_exceptions_become_errnos(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        fd = os.open(m.path("src"), os.O_RDONLY)
        try:
            # 100-byte parts: a whole-file read is 164 of them (more than the C side keeps on its stack)
            assert os.pread(fd, len(SRC_DATA), 0) == SRC_DATA
            assert os.pread(fd, 1000, 12345) == SRC_DATA[12345:13345]
            assert os.pread(fd, 4096, len(SRC_DATA) - 10) == SRC_DATA[-10:]
            assert os.pread(fd, 4096, len(SRC_DATA)) == b""
        finally:
            os.close(fd)
        with pytest.raises(PermissionError):
            m.path("deny").read_bytes()
        assert errno_from(m.path("drop").read_bytes) == errno.EIO
    errs = [(r["op"], r["exc"].split("(")[0]) for r in m.records("errno_of")]
    assert ("read", "PermissionError") in errs and ("read", "ValueError") in errs
    (exit_rec,) = m.records("exit")
    assert ops_count(exit_rec, "read", "failed") == 2
    assert "read failure" in exit_rec["last_exception"]


def test_writes_now_later_kept_and_failed(tmp_path):
    """Writes answered at once, deferred writes (a coroutine), and 1 MiB writes whose data the method
    keeps: it arrives as a WriteData over libfuse's receive buffer, and what is kept never changes."""
    pats = [os.urandom(1 << 20) for _ in range(6)]
    buf = mmap.mmap(-1, 1 << 20)        # page-aligned, so that direct_io sends each write in one request
    with toy_mount(tmp_path, "normal") as m:
        fd = os.open(m.path("src"), os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 5000, 100) == 5000
            assert os.pwrite(fd, b"y" * 3000, 2 << 20) == 3000                  # deferred
            for i in range(200):                                                # back to back: chained
                assert os.pwrite(fd, bytes([i]) * 512, 8192 + 512 * i) == 512
            for i, p in enumerate(pats):
                buf[:] = p
                assert os.pwrite(fd, buf, KEEP_FROM + (i << 20)) == 1 << 20    # kept by the method
                buf[:] = p[::-1]
                assert os.pwrite(fd, buf, 0) == 1 << 20                         # stored, buffer reused
            buf[:] = pats[3]
            assert os.pwrite(fd, buf, 3 << 20) == 1 << 20                       # deferred, big
        finally:
            os.close(fd)
        for name, e in (("deny", errno.EPERM), ("drop", errno.EIO)):
            fd = os.open(m.path(name), os.O_WRONLY)
            try:
                assert errno_from(os.pwrite, fd, b"z", 0) == e
            finally:
                os.close(fd)
    sha = [hashlib.sha256(p).hexdigest() for p in pats]
    (kept,) = m.records("kept")
    assert [tuple(k) for k in kept["writes"]] == [
        (KEEP_FROM + (i << 20), sha[i], sha[i], "WriteData", 1 << 20) for i in range(6)]
    assert [(r["off"], r["size"]) for r in m.records("write_later")] == [(2 << 20, 3000), (3 << 20, 1 << 20)]
    assert m.records("write_later")[1]["sha"] == sha[3], "a deferred write's data stayed intact"
    assert {r["type"] for r in m.records("write") if r["size"] == 1 << 20} == {"WriteData"}
    assert m.records("write")[0]["type"] == "bytes"
    (exit_rec,) = m.records("exit")
    c = exit_rec["counts"]
    assert ops_count(exit_rec, "write") == 1 + 1 + 200 + 12 + 1 + 2
    assert ops_count(exit_rec, "write", "deferred") == 2 and ops_count(exit_rec, "write", "failed") == 2
    assert c["write_kept"] >= 6 and c["chained"] > 0
    assert "write failure" in exit_rec["last_exception"]


@pytest.mark.parametrize("mode", ["normal", "nochain"])
def test_chains_and_deferred_requests_interleave(tmp_path, mode):
    """Three readers, each listing the directory and asking statfs (deferred) now and then: a deferred
    request ends a chain and its task answers it (else a request is never answered and the watchdog
    fails the test)."""
    errors = []
    with toy_mount(tmp_path, mode) as m:
        def reader(k):
            fd = os.open(m.path("src"), os.O_RDONLY)
            try:
                for i in range(600):
                    off = (i * 97 + k * 1000) % len(SRC_DATA)
                    if os.pread(fd, 300, off) != SRC_DATA[off:off + 300]:
                        errors.append((k, i, off))
                    if i % 25 == 0 and sorted(os.listdir(m.mnt)) != ["deny", "drop", "dst", "src"]:
                        errors.append((k, i, "listdir"))
                    if i % 50 == 0 and os.statvfs(m.mnt).f_namemax != 255:
                        errors.append((k, i, "statfs"))
            finally:
                os.close(fd)
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    (exit_rec,) = m.records("exit")
    assert ops_count(exit_rec, "read") == 3 * 600
    assert ops_count(exit_rec, "statfs", "deferred") == ops_count(exit_rec, "statfs") >= 3 * 12
    if mode == "normal":
        assert exit_rec["counts"]["chained"] > 0
    else:
        assert exit_rec["counts"]["chained"] == 0


def test_lookup_getattr_unlink_and_forget(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        st = os.stat(m.path("src"))
        assert (st.st_ino, st.st_size, st.st_blksize, st.st_blocks) == (2, len(SRC_DATA), 4096, 32)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_nlink == 1
        assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME_NS, MTIME_NS)
        assert errno_from(os.stat, m.path("nothing")) == errno.ENOENT
        assert errno_from(os.stat, m.path("slow")) == errno.ENOENT       # deferred, then raised
        assert errno_from(os.stat, m.path("bad")) == errno.EIO           # a value that is no entry
        os.unlink(m.path("src"))
        assert errno_from(os.stat, m.path("src")) == errno.ENOENT
        assert errno_from(os.unlink, m.path("deny")) == errno.EPERM
        assert errno_from(os.unlink, m.path("drop")) == errno.EIO
        deadline = time.monotonic() + 10                                # the unlinked inode is evicted
        while not any(ino == 2 for r in m.records("forget") for ino, _ in r["inodes"]):
            assert time.monotonic() < deadline, "no forget for the unlinked inode"
            time.sleep(0.05)
    assert [r["name"] for r in m.records("unlink")] == ["src", "deny", "drop"]
    (exit_rec,) = m.records("exit")
    c = exit_rec["counts"]
    assert c["bad_values"] == 1 and ops_count(exit_rec, "lookup", "deferred") == 1
    assert ops_count(exit_rec, "unlink", "failed") == 2
    assert "unlink failure" in exit_rec["last_exception"]


def test_open_create_and_release(tmp_path):
    old_umask = os.umask(0o027)
    try:
        with toy_mount(tmp_path, "normal") as m:
            for _ in range(3):
                with open(m.path("src"), "rb") as f:
                    assert f.read() == SRC_DATA
            fd = os.open(m.path("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            assert os.write(fd, b"abc") == 3
            os.close(fd)
            assert os.stat(m.path("new")).st_size == 3
            os.close(os.open(m.path("later"), os.O_CREAT | os.O_WRONLY, 0o644))    # deferred create
            assert errno_from(os.open, m.path("eperm"), os.O_CREAT | os.O_WRONLY, 0o644) == errno.EPERM
            assert errno_from(os.open, m.path("badc"), os.O_CREAT | os.O_WRONLY, 0o644) == errno.EIO
            deadline = time.monotonic() + 10                    # RELEASE is sent after close() returns
            while len(m.records("release")) < 5:
                assert time.monotonic() < deadline, m.records("release")
                time.sleep(0.05)
    finally:
        os.umask(old_umask)
    opened = m.records("open")
    assert [r["ino"] for r in opened] == [2, 2, 2]
    assert all(r["pid"] == os.getpid() and r["flags"] & os.O_ACCMODE == os.O_RDONLY for r in opened)
    created = {r["name"]: r for r in m.records("create")}
    assert set(created) == {"new", "later", "eperm", "badc"}
    new = created["new"]
    assert (new["uid"], new["gid"], new["pid"]) == (os.getuid(), os.getgid(), os.getpid())
    assert new["umask"] == 0o027 and stat.S_ISREG(new["mode"]) and new["flags"] & os.O_EXCL
    assert new["mode"] & 0o777 == 0o666, "modes come unmasked (FUSE_CAP_DONT_MASK); the umask beside them"
    # every handle open and create gave out came back exactly once (the malformed create's is lost)
    assert sorted(r["fh"] for r in m.records("release")) == [100, 101, 102, 103, 104]
    (mounted,) = m.records("mounted")
    (exit_rec,) = m.records("exit")
    assert ops_count(exit_rec, "create", "deferred") == 1 and exit_rec["counts"]["bad_values"] == 1
    assert "create returned" in exit_rec["last_exception"]


def test_directories_list_over_several_replies_and_count_each_entry_once(tmp_path):
    with toy_mount(tmp_path, "dirs") as m:
        names = sorted(os.listdir(m.mnt))
        assert names == sorted(["src", "dst", "deny", "drop"] + ["n%03d" % i for i in range(400)])
        assert os.stat(m.path("n399")).st_size == 399                  # attributes came with the entries
        deadline = time.monotonic() + 10                                # RELEASEDIR comes after closedir
        while not m.records("releasedir"):
            assert time.monotonic() < deadline, "no releasedir"
            time.sleep(0.05)
    calls = m.records("readdirplus")
    assert len(calls) >= 3 and all(c["fh"] == 7 for c in calls)        # several replies, the handle kept
    assert [c["off"] for c in calls] == sorted({c["off"] for c in calls})   # each resumes where one ended
    counted = [r["ino"] for r in m.records("looked_up")]
    assert sorted(counted) == list(range(2, 6 + 400)), "each entry but . and .. counted once"
    assert [r["ino"] for r in m.records("opendir")] == [1]
    assert [r["fh"] for r in m.records("releasedir")] == [7]


def test_lseek_answers_offsets_and_errnos(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        fd = os.open(m.path("src"), os.O_RDONLY)
        try:
            assert os.lseek(fd, 123, os.SEEK_DATA) == 123
            assert os.lseek(fd, 0, os.SEEK_HOLE) == len(SRC_DATA)
            assert os.lseek(fd, 7, os.SEEK_SET) == 7                    # the kernel's own
        finally:
            os.close(fd)
        for name, e in (("deny", errno.ENXIO), ("drop", errno.EIO)):
            fd = os.open(m.path(name), os.O_RDONLY)
            try:
                assert errno_from(os.lseek, fd, 0, os.SEEK_DATA) == e
            finally:
                os.close(fd)
    assert [(r["off"], r["whence"]) for r in m.records("lseek")][:2] == [(123, os.SEEK_DATA), (0, os.SEEK_HOLE)]
    (exit_rec,) = m.records("exit")
    assert ops_count(exit_rec, "lseek") == 4 and exit_rec["counts"]["bad_values"] == 1


def test_shared_mappings_are_negotiated(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        (mounted,) = m.records("mounted")
        neg = mounted["negotiated"]
        assert neg is None or neg["direct_io_allow_mmap"]                # INIT may come after "mounted"
        with open(m.path("src"), "r+b") as f, mmap.mmap(f.fileno(), len(SRC_DATA)) as mm:
            assert mm[:256] == SRC_DATA[:256]


LOAD_AFTER_PYFUSE3 = textwrap.dedent("""
    import pyfuse3
    from reflinkfs.fuse import extops
    st = extops.load(strict=False)
    assert not st and not st.effective and "pyfuse3" in st.reason, st
    try:
        extops.load()
    except extops.LoadOrderError:
        print("OK")
""")


def test_load_after_pyfuse3_is_refused():
    r = subprocess.run([sys.executable, "-c", LOAD_AFTER_PYFUSE3],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


MOUNT_AFTER_PYFUSE3 = textwrap.dedent("""
    import sys
    import pyfuse3
    from reflinkfs.errors import StoreError
    from reflinkfs.fuse import mount
    try:
        mount.run(mount.MountOptions(store=sys.argv[1], mountpoint=sys.argv[2]))
    except StoreError as e:
        print("refused:", e)
""")


def test_a_mount_without_the_table_is_refused(tmp_path):
    """pyfuse3 alone has nothing to call: a daemon whose table could not get in refuses to mount, in one
    line, before it touches the store."""
    r = subprocess.run([sys.executable, "-c", MOUNT_AFTER_PYFUSE3, str(tmp_path / "store"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: ") and "pyfuse3 was imported before" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
