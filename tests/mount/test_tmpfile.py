"""O_TMPFILE on a real mount: an open file in no directory, that linkat() may give a name.

The kernel sends FUSE_TMPFILE, which pyfuse3 does not register; extops answers it (set_file_handlers'
tmpfile). Names are given with linkat(fd, "", dirfd, name, AT_EMPTY_PATH), which needs
CAP_DAC_READ_SEARCH (these tests run as root); the unprivileged way, linkat of /proc/self/fd/N with
AT_SYMLINK_FOLLOW, reaches the same LINK request.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import stat

from mountutil import AT_FDCWD, assert_fsck_clean, fsck, fusermount, is_mounted, wait_for

AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def link_fd(fd: int, path) -> None:
    """Give an open file a name: linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH)."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def tmpfile(d, mode=0o600, flags=os.O_RDWR) -> int:
    return os.open(d, os.O_TMPFILE | flags, mode)


def test_tmpfile_reads_writes_and_stats_like_a_file(workdir):
    old = os.umask(0o022)
    try:
        fd = tmpfile(workdir, 0o666)
    finally:
        os.umask(old)
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644   # mode & ~umask
        assert (st.st_nlink, st.st_uid, st.st_gid, st.st_size) == (0, os.getuid(), os.getgid(), 0)
        assert os.listdir(workdir) == []
        data = os.urandom(3 * 4096 + 17)
        assert os.pwrite(fd, data, 0) == len(data)
        assert os.pread(fd, len(data) + 10, 0) == data
        os.ftruncate(fd, 5000)
        assert os.fstat(fd).st_size == 5000
        assert os.pread(fd, 10000, 0) == data[:5000]
        assert os.listdir(workdir) == []
    finally:
        os.close(fd)
    assert os.listdir(workdir) == []


def test_tmpfile_linked_into_the_tree_then_unlinked(workdir):
    fd = tmpfile(workdir)
    try:
        os.write(fd, b"complete contents")
        link_fd(fd, workdir / "visible")
        assert os.listdir(workdir) == ["visible"]
        st = os.stat(workdir / "visible")
        assert st.st_ino == os.fstat(fd).st_ino and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o600
        assert (workdir / "visible").read_bytes() == b"complete contents"
        os.unlink(workdir / "visible")
        assert os.listdir(workdir) == []
        assert os.fstat(fd).st_nlink == 0
        os.write(fd, b"!")                       # still open, still usable
        assert os.pread(fd, 100, 0) == b"complete contents!"
        # linked once, then unlinked: an ordinary unlinked file now, which the VFS does not link again
        try:
            link_fd(fd, workdir / "again")
            raise AssertionError("linking an unlinked file succeeded")
        except OSError as e:
            assert e.errno == errno.ENOENT
    finally:
        os.close(fd)


def test_tmpfile_with_o_excl_is_never_linked(workdir):
    fd = tmpfile(workdir, flags=os.O_RDWR | os.O_EXCL)
    try:
        os.write(fd, b"x")
        try:
            link_fd(fd, workdir / "name")
            raise AssertionError("an O_EXCL tmpfile was linked")
        except OSError as e:
            assert e.errno == errno.ENOENT
    finally:
        os.close(fd)
    assert os.listdir(workdir) == []


def test_open_tmpfile_after_a_crash_is_an_orphan_freed_at_the_next_mount(mounts):
    store = mounts.store()
    m = mounts.mount(store, options=["--commit-interval", "3600"])
    os.mkdir(m.path("dir"))
    fd = tmpfile(m.path("dir"))
    os.write(fd, b"t" * 100_000)
    os.fsync(fd)                                   # commits: the store now holds the tmpfile
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_daemon_exit(30)
    try:
        os.close(fd)
    except OSError as e:
        assert e.errno == errno.ENOTCONN
    assert fusermount(m.mnt) == 0
    wait_for(lambda: not is_mounted(m.mnt), 10, "the dead mount to go")

    r = fsck(store)                                # what fsck says of a file unlinked while open
    findings = [line for line in (r.stdout + r.stderr).splitlines() if "orphan:" in line]
    assert r.returncode != 0 and len(findings) == 1, r.stdout + r.stderr
    assert "unlinked while open" in findings[0] and "freed at next mount" in findings[0]

    m = mounts.mount(store, m.mnt)                 # frees it; the teardown's fsck must be clean
    assert os.listdir(m.path("dir")) == []
    m.unmount()
    assert_fsck_clean(store)
