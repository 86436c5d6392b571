"""Real-mount tests for reflinkfs.fuse.extops (copy_file_range / fallocate).

Each test mounts tests/mount/_toyfs.py in a child process (which calls
extops.load() before importing pyfuse3) and talks to it with real syscalls.
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
META_ATIME_NS = -1_500_000_001     # ... and these _toyfs.META_*
META_MTIME_NS = 1_234_567_891_234_567_891
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


def test_copy_file_range_and_fallocate_reach_handlers(tmp_path):
    with toy_mount(tmp_path, "normal") as m:
        (mounted,) = m.records("mounted")
        assert mounted["interposed"] is True

        src, dst = m.path("src"), m.path("dst")
        assert src.read_bytes() == SRC_DATA
        src_ino, dst_ino = os.stat(src).st_ino, os.stat(dst).st_ino

        # --- copy_file_range --------------------------------------------
        writes_before = len(m.records("write"))
        fd_in = os.open(src, os.O_RDONLY)
        fd_out = os.open(dst, os.O_WRONLY)
        try:
            n = os.copy_file_range(fd_in, fd_out, 10000, 100, 0)
        finally:
            os.close(fd_in)
            os.close(fd_out)
        assert n == 10000
        assert dst.read_bytes() == SRC_DATA[100:10100]

        (rec,) = m.records("copy_file_range")
        assert (rec["ino_in"], rec["fh_in"], rec["off_in"]) == (src_ino, src_ino, 100)
        assert (rec["ino_out"], rec["fh_out"], rec["off_out"]) == (dst_ino, dst_ino, 0)
        assert rec["length"] == 10000 and rec["flags"] == 0
        assert rec["replied"] == 10000
        assert rec["double_reply_raised"] is True
        assert rec["pid"] == os.getpid()
        assert (rec["uid"], rec["gid"]) == (os.getuid(), os.getgid())
        assert rec["counts"]["copy_file_range"] == 1
        # the handler did the copy, not the kernel's read/write fallback
        assert len(m.records("write")) == writes_before

        # --- fallocate ----------------------------------------------------
        fd = os.open(dst, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 50000)
            assert os.fstat(fd).st_size == 50000
        finally:
            os.close(fd)
        (fa,) = m.records("fallocate")
        assert (fa["ino"], fa["fh"], fa["mode"], fa["offset"], fa["length"]) == (
            dst_ino, dst_ino, 0, 0, 50000)
        assert fa["pid"] == os.getpid()
        assert fa["counts"]["fallocate"] == 1
        # glibc did not emulate it with writes
        assert len(m.records("write")) == writes_before
        data = dst.read_bytes()
        assert len(data) == 50000 and data[:10000] == SRC_DATA[100:10100]
        assert data[10000:] == bytes(40000)

        # --- a handler that never replies: dealloc answers EIO -----------
        fd = os.open(m.path("drop"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.posix_fallocate(fd, 0, 4096)
            assert ei.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert m.records("fallocate")[-1].get("dropped") is True

    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["read"] == 0, "without a read handler pyfuse3 serves reads"
    assert exit_rec["counts"]["copy_file_range"] == 1
    assert exit_rec["counts"]["fallocate"] == 2
    assert exit_rec["counts"]["dropped"] == 1
    assert exit_rec["counts"]["default_replies"] == 0


def test_raising_handlers_fall_back_without_hanging(tmp_path):
    with toy_mount(tmp_path, "raise") as m:
        assert m.records("mounted")[0]["interposed"] is True
        src, dst = m.path("src"), m.path("dst")

        # Handler raises -> ENOSYS -> kernel disables the op for this mount and
        # copies the bytes itself (read + write through the daemon). A kernel
        # that asks with FUSE_COPY_FILE_RANGE_64 first (Linux >= 6.18) asks
        # once in each form before it gives up.
        fd_in = os.open(src, os.O_RDONLY)
        fd_out = os.open(dst, os.O_WRONLY)
        try:
            n = os.copy_file_range(fd_in, fd_out, 5000, 0, 0)
            assert 0 < n <= 5000
            total = n
            while total < 5000:  # the generic fallback may copy less per call
                k = os.copy_file_range(fd_in, fd_out, 5000 - total, total, total)
                assert k > 0
                total += k
        finally:
            os.close(fd_in)
            os.close(fd_out)
        assert dst.read_bytes() == SRC_DATA[:5000]
        cfr = m.records("copy_file_range")
        tries = 1 + cfr[-1]["counts"]["copy_file_range_64"]
        assert len(cfr) == tries <= 2, "ENOSYS must disable copy_file_range for the mount"
        assert all(r["raised"] for r in cfr)
        assert m.records("write"), "kernel fallback should have written the data"

        # fallocate handler raises -> EOPNOTSUPP -> glibc emulates with writes.
        fd = os.open(dst, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 16384)
            assert os.fstat(fd).st_size >= 16384
        finally:
            os.close(fd)
        assert m.records("fallocate")[0]["raised"] is True

    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["copy_file_range"] == tries
    assert exit_rec["counts"]["fallocate"] >= 1
    assert exit_rec["counts"]["default_replies"] == exit_rec["counts"]["copy_file_range"] + exit_rec["counts"]["fallocate"]
    assert "ValueError" in exit_rec["last_exception"]


def test_read_handler_replies_with_an_iovec_or_an_errno(tmp_path):
    with toy_mount(tmp_path, "readv") as m:
        src = m.path("src")
        fd = os.open(src, os.O_RDONLY)
        try:
            # 100-byte parts: a whole-file read is 164 of them (more than the C side keeps on its stack)
            assert os.pread(fd, len(SRC_DATA), 0) == SRC_DATA
            assert os.pread(fd, 1000, 12345) == SRC_DATA[12345:13345]
            assert os.pread(fd, 4096, len(SRC_DATA) - 10) == SRC_DATA[-10:]
            assert os.pread(fd, 4096, len(SRC_DATA)) == b""
        finally:
            os.close(fd)
        with pytest.raises(PermissionError):
            m.path("dst").read_bytes()
        with pytest.raises(OSError) as ei:
            m.path("drop").read_bytes()
        assert ei.value.errno == errno.EIO
    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["read"] >= 3          # src (at least once), dst, drop
    assert exit_rec["counts"]["default_replies"] >= 1
    assert "read handler failure" in exit_rec["last_exception"]


@pytest.mark.parametrize("mode", ["readv", "readv-nochain"])
def test_read_chains_serve_reads_and_leave_other_requests_to_the_loop(tmp_path, mode):
    """Three readers of small direct_io reads, each listing the directory now and then: in a chain, an
    opendir/readdir arriving between reads must end the chain and have its coroutine awaited by
    pyfuse3's loop (else a request is never answered and the watchdog fails the test)."""
    errors = []
    with toy_mount(tmp_path, mode) as m:
        def reader(k):
            fd = os.open(m.path("src"), os.O_RDONLY)
            try:
                for i in range(600):
                    off = (i * 97 + k * 1000) % len(SRC_DATA)
                    if os.pread(fd, 300, off) != SRC_DATA[off:off + 300]:
                        errors.append((k, i, off))
                    if i % 25 == 0 and sorted(os.listdir(m.mnt)) != ["drop", "dst", "src"]:
                        errors.append((k, i, "listdir"))
            finally:
                os.close(fd)
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["read"] == 3 * 600
    assert exit_rec["counts"]["default_replies"] == 0
    if mode == "readv":
        assert exit_rec["counts"]["chained"] > 0
    else:
        assert exit_rec["counts"]["chained"] == 0


def test_write_handler_writes_answers_errnos_and_passes_writes_on(tmp_path):
    with toy_mount(tmp_path, "writev") as m:
        fd = os.open(m.path("src"), os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 5000, 100) == 5000            # the handler
            assert os.pwrite(fd, b"y" * 3000, 2 << 20) == 3000        # passed on: pyfuse3's handler
            for i in range(200):                                       # back to back: chained
                assert os.pwrite(fd, bytes([i]) * 512, 8192 + 512 * i) == 512
        finally:
            os.close(fd)
        fd = os.open(m.path("dst"), os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"z", 0)
        finally:
            os.close(fd)
        fd = os.open(m.path("drop"), os.O_WRONLY)
        try:
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"w" * 100, 0)
            assert ei.value.errno == errno.EIO
        finally:
            os.close(fd)
    now = m.records("write_now")
    assert [(r["off"], r["size"], r["type"]) for r in now[:1]] == [(100, 5000, "bytes")] and len(now) == 201
    assert [(r["off"], r["size"]) for r in m.records("write")] == [(2 << 20, 3000)]
    (exit_rec,) = m.records("exit")
    c = exit_rec["counts"]
    assert c["write"] == 1 + 1 + 200 + 1 + 1 and c["write_passed"] == 1
    assert c["default_replies"] == 1 and c["chained"] > 0
    assert "write handler failure" in exit_rec["last_exception"]


def test_big_writes_reach_the_handler_uncopied_and_kept_data_stays_intact(tmp_path):
    """A 1 MiB write arrives as a WriteData over libfuse's receive buffer. A handler that keeps it owns
    that buffer from then on: later requests are received elsewhere, so what it kept never changes."""
    pats = [os.urandom(1 << 20) for _ in range(12)]
    buf = mmap.mmap(-1, 1 << 20)        # page-aligned, so that direct_io sends each write in one request
    with toy_mount(tmp_path, "writev") as m:
        fd = os.open(m.path("src"), os.O_WRONLY)
        try:
            for i, p in enumerate(pats):
                buf[:] = p
                assert os.pwrite(fd, buf, (8 << 20) + (i << 20)) == 1 << 20   # kept by the handler
                buf[:] = p[::-1]
                assert os.pwrite(fd, buf, 0) == 1 << 20                        # copied: its buffer is reused
            buf[:] = pats[5]
            assert os.pwrite(fd, buf, 2 << 20) == 1 << 20                      # passed on to pyfuse3
        finally:
            os.close(fd)
    sha = [hashlib.sha256(p).hexdigest() for p in pats]
    (kept,) = m.records("kept")
    assert [tuple(k) for k in kept["writes"]] == [
        ((8 << 20) + (i << 20), sha[i], sha[i], "WriteData", 1 << 20) for i in range(12)]
    assert [(r["off"], r["type"]) for r in m.records("write_now")
            if r["off"] == 0] == [(0, "WriteData")] * 12
    assert [(r["off"], r["size"], r["sha"]) for r in m.records("write")] == [(2 << 20, 1 << 20, sha[5])]
    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["write_kept"] == 12 and exit_rec["last_exception"] is None


def test_meta_handlers_answer_lookup_getattr_unlink_and_forget(tmp_path):
    with toy_mount(tmp_path, "meta") as m:
        st = os.stat(m.path("src"))
        assert (st.st_ino, st.st_size, st.st_blksize, st.st_blocks) == (2, len(SRC_DATA), 4096, 32)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 and st.st_nlink == 1
        assert (st.st_atime_ns, st.st_mtime_ns) == (META_ATIME_NS, META_MTIME_NS)
        assert os.stat(m.path("dst")).st_mtime_ns != META_MTIME_NS      # pyfuse3's getattr answered
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("nothing"))
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("pass"))                                     # pyfuse3's lookup answered
        with pytest.raises(OSError) as ei:
            os.stat(m.path("bad"))
        assert ei.value.errno == errno.EIO
        os.unlink(m.path("src"))
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("src"))
        with pytest.raises(PermissionError):
            os.unlink(m.path("dst"))
        with pytest.raises(OSError) as ei:
            os.unlink(m.path("drop"))
        assert ei.value.errno == errno.EIO
        deadline = time.monotonic() + 10                                # the unlinked inode is evicted
        while not any(ino == 2 for r in m.records("forget_now") for ino, _ in r["inodes"]):
            assert time.monotonic() < deadline, "no forget for the unlinked inode"
            time.sleep(0.05)
    assert [r["name"] for r in m.records("lookup")] == ["pass"]
    assert {r["ino"] for r in m.records("getattr")} == {3}
    assert m.records("unlink") == []
    assert [r["name"] for r in m.records("unlink_now")] == ["src", "dst", "drop"]
    (exit_rec,) = m.records("exit")
    c = exit_rec["counts"]
    assert c["meta"] >= 10 and c["meta_passed"] >= 2 and c["default_replies"] == 2
    assert "unlink handler failure" in exit_rec["last_exception"]


def test_file_handlers_answer_open_create_and_release_and_flush_stops(tmp_path):
    old_umask = os.umask(0o027)
    try:
        with toy_mount(tmp_path, "files") as m:
            for _ in range(3):                                  # opened by open_now, read by pyfuse3
                with open(m.path("src"), "rb") as f:
                    assert f.read() == SRC_DATA
            with open(m.path("dst"), "rb") as f:                # open passed on to pyfuse3
                assert f.read() == b""
            with pytest.raises(OSError) as ei:
                open(m.path("drop"), "rb")
            assert ei.value.errno == errno.EIO
            fd = os.open(m.path("new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            assert os.write(fd, b"abc") == 3
            os.close(fd)
            st = os.stat(m.path("new"))
            assert stat.S_ISREG(st.st_mode) and st.st_size == 3
            with pytest.raises(PermissionError):
                os.open(m.path("eperm"), os.O_CREAT | os.O_WRONLY, 0o644)
            with pytest.raises(OSError) as ei:
                os.open(m.path("bad"), os.O_CREAT | os.O_WRONLY, 0o644)
            assert ei.value.errno == errno.EIO
            os.close(os.open(m.path("passc"), os.O_CREAT | os.O_WRONLY, 0o644))   # pyfuse3's create
            deadline = time.monotonic() + 10                    # RELEASE is sent after close() returns
            while len(m.records("release_now")) < 6:
                assert time.monotonic() < deadline, m.records("release_now")
                time.sleep(0.05)
    finally:
        os.umask(old_umask)
    opened = m.records("open_now")
    assert [r["ino"] for r in opened] == [2, 2, 2, 3, 4]
    assert all(r["pid"] == os.getpid() and r["flags"] & os.O_ACCMODE == os.O_RDONLY for r in opened)
    assert [r["ino"] for r in m.records("open")] == [3]
    assert [r["name"] for r in m.records("create")] == ["passc"]
    created = {r["name"]: r for r in m.records("create_now")}
    assert set(created) == {"new", "eperm", "bad", "passc"}
    new = created["new"]
    assert (new["uid"], new["gid"], new["pid"]) == (os.getuid(), os.getgid(), os.getpid())
    assert new["umask"] == 0o027 and stat.S_ISREG(new["mode"]) and new["flags"] & os.O_EXCL
    # every handle open_now and create_now gave out came back exactly once; pyfuse3's went to pyfuse3
    passc = 6                                                   # pyfuse3's create: fh = inode
    assert sorted(r["fh"] for r in m.records("release_now")) == [3, passc, 100, 101, 102, 103]
    assert sorted(r["fh"] for r in m.records("release")) == [3, passc]
    assert m.records("flush") == []                             # ENOSYS once, then never sent
    (exit_rec,) = m.records("exit")
    c = exit_rec["counts"]
    assert c["meta_passed"] == 4 and c["default_replies"] == 2   # passed: 2 opens/creates, 2 releases
    assert "create handler returned" in exit_rec["last_exception"]


def test_dir_handlers_list_a_directory_over_several_replies_and_count_each_entry_once(tmp_path):
    with toy_mount(tmp_path, "dirs") as m:
        names = sorted(os.listdir(m.mnt))
        assert names == sorted(["src", "dst", "drop"] + ["n%03d" % i for i in range(400)])
        assert os.stat(m.path("n399")).st_size == 399                  # attributes came with the entries
        deadline = time.monotonic() + 10                                # RELEASEDIR comes after closedir
        while not m.records("releasedir_now"):
            assert time.monotonic() < deadline, "no releasedir"
            time.sleep(0.05)
    calls = m.records("readdir_now")
    assert len(calls) >= 3 and all(c["fh"] == 7 for c in calls)        # several replies, the handle kept
    assert [c["off"] for c in calls] == sorted({c["off"] for c in calls})   # each resumes where one ended
    counted = [r["ino"] for r in m.records("looked_up")]
    assert sorted(counted) == list(range(2, 5 + 400)), "each entry but . and .. counted once"
    assert [r["ino"] for r in m.records("opendir_now")] == [1]
    assert [r["fh"] for r in m.records("releasedir_now")] == [7]


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


def test_lseek_handler_answers_seek_data_and_hole_errnos_and_passes_on(tmp_path):
    with toy_mount(tmp_path, "lseek") as m:
        fds = {name: os.open(m.path(name), os.O_RDONLY) for name in ("src", "dst", "drop")}
        try:
            src = fds["src"]
            assert os.lseek(src, 100, os.SEEK_DATA) == 101          # the handler's answer, not the kernel's
            assert os.lseek(src, 100, os.SEEK_HOLE) == len(SRC_DATA)
            assert os.lseek(src, 5, os.SEEK_SET) == 5                # never sent to the daemon
            for name, whence, code in (("dst", os.SEEK_DATA, errno.ENXIO), ("drop", os.SEEK_DATA, errno.EIO),
                                       ("drop", os.SEEK_HOLE, errno.EIO)):
                with pytest.raises(OSError) as ei:
                    os.lseek(fds[name], 0, whence)
                assert ei.value.errno == code, (name, whence)
            # passed on: pyfuse3 answers ENOSYS, and the kernel answers itself from then on (all data)
            assert os.lseek(src, 9000, os.SEEK_HOLE) == len(SRC_DATA)
            assert os.lseek(src, 100, os.SEEK_DATA) == 100
        finally:
            for fd in fds.values():
                os.close(fd)
    calls = [(r["fh"], r["off"], r["whence"]) for r in m.records("lseek_now")]
    assert calls == [(2, 100, os.SEEK_DATA), (2, 100, os.SEEK_HOLE), (3, 0, os.SEEK_DATA),
                     (4, 0, os.SEEK_DATA), (4, 0, os.SEEK_HOLE), (2, 9000, os.SEEK_HOLE)]
    (exit_rec,) = m.records("exit")
    assert exit_rec["counts"]["default_replies"] == 2
    assert "lseek handler returned" in exit_rec["last_exception"]
