"""POSIX operations on a real mount, each with the result and errno a real Linux filesystem gives.

One mount for the module (a store limited to 256 MiB, so that statfs numbers do not depend on the
disk under the store); every test works in its own fresh directory.
"""
from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import threading
import time

import pytest

from mountutil import (RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT, getxattr_sized,
                       listxattr_sized, renameat2, utimensat)

MKFS_ARGS = ("--size", "256M")
BS = 4096


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    return ei.value.errno


def write_file(path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(autouse=True)
def _umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- lookup and attributes -----------------------------------------------------------------------
def test_lookup_getattr(workdir):
    f = workdir / "f"
    before = time.time_ns()
    write_file(f, b"hello")
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_size, st.st_nlink, st.st_uid, st.st_gid) == (5, 1, os.getuid(), os.getgid())
    assert st.st_blksize == BS and st.st_blocks == 8
    assert before - 10**9 <= st.st_mtime_ns <= time.time_ns() + 10**9
    assert st.st_ino == os.stat(f).st_ino != os.stat(workdir).st_ino
    d = os.stat(workdir)
    assert stat.S_ISDIR(d.st_mode) and d.st_nlink == 2
    assert os.stat(workdir / ".").st_ino == d.st_ino
    assert os.stat(workdir / "..").st_ino == os.stat(workdir.parent).st_ino
    assert errno_of(os.stat, workdir / "missing") == errno.ENOENT
    assert errno_of(os.stat, workdir / "f" / "x") == errno.ENOTDIR
    assert errno_of(os.listdir, f) == errno.ENOTDIR
    assert sorted(os.listdir(workdir)) == ["f"]


def test_chmod(workdir):
    f, d = workdir / "f", workdir / "d"
    write_file(f, b"x")
    os.mkdir(d)
    for mode in (0o600, 0o4755, 0o2711, 0o0, 0o777):
        old_ctime = os.stat(f).st_ctime_ns
        os.chmod(f, mode)
        st = os.stat(f)
        assert stat.S_IMODE(st.st_mode) == mode and stat.S_ISREG(st.st_mode)
        assert st.st_ctime_ns >= old_ctime
    os.chmod(d, 0o1777)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777 and stat.S_ISDIR(os.stat(d).st_mode)
    assert errno_of(os.chmod, workdir / "missing", 0o600) == errno.ENOENT


def test_chown(workdir):
    f = workdir / "f"
    write_file(f, b"x")
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(f, -1, 42)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 42)
    os.chown(f, 7, -1)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (7, 42)
    # chown of a regular file clears set-user-ID (and set-group-ID when group-executable), as on ext4
    os.chmod(f, 0o6755)
    os.chown(f, 8, 9)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    # lchown changes the link, not its target
    os.symlink("f", workdir / "l")
    os.chown(workdir / "l", 11, 12, follow_symlinks=False)
    assert (os.lstat(workdir / "l").st_uid, os.lstat(workdir / "l").st_gid) == (11, 12)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (8, 9)


def test_truncate(workdir):
    f = workdir / "f"
    data = random.Random(1).randbytes(3 * BS + 100)
    write_file(f, data)
    os.truncate(f, 10 * BS + 7)                     # grow: zeros
    assert read_file(f) == data + bytes(10 * BS + 7 - len(data))
    os.truncate(f, BS + 10)                         # shrink into a block
    assert read_file(f) == data[:BS + 10]
    os.truncate(f, 2 * BS)                          # grow again: the cut tail must read as zeros
    assert read_file(f) == data[:BS + 10] + bytes(BS - 10)
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == 5
        assert os.pread(fd, 100, 0) == data[:5]
        os.utime(f, ns=(0, 0))
        os.ftruncate(fd, 6)
        assert os.fstat(fd).st_mtime_ns > 0, "truncate must update mtime"
    finally:
        os.close(fd)
    os.truncate(f, 0)
    assert read_file(f) == b"" and os.stat(f).st_blocks == 0
    assert errno_of(os.truncate, f, -1) == errno.EINVAL
    assert errno_of(os.truncate, workdir, 0) == errno.EISDIR
    assert errno_of(os.truncate, workdir / "missing", 0) == errno.ENOENT


def test_utime(workdir):
    f = workdir / "f"
    write_file(f, b"x")
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # negative and far-future times survive
    os.utime(f, ns=(-5_000_000_001, 4_102_444_800_999_999_999))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-5_000_000_001, 4_102_444_800_999_999_999)
    # UTIME_NOW for both (utimes(NULL))
    before = time.time_ns()
    os.utime(f)
    after = time.time_ns()
    st = os.stat(f)
    assert before - 10**7 <= st.st_atime_ns <= after + 10**7
    assert before - 10**7 <= st.st_mtime_ns <= after + 10**7
    # UTIME_OMIT: the omitted one is kept
    utimensat(f, (7, 8), (0, UTIME_OMIT))
    st2 = os.stat(f)
    assert st2.st_atime_ns == 7_000_000_008 and st2.st_mtime_ns == st.st_mtime_ns
    utimensat(f, (0, UTIME_OMIT), (9, 10))
    st3 = os.stat(f)
    assert st3.st_atime_ns == 7_000_000_008 and st3.st_mtime_ns == 9_000_000_010
    # UTIME_NOW for one, the other omitted
    before = time.time_ns()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))
    st4 = os.stat(f)
    assert st4.st_atime_ns == 7_000_000_008 and st4.st_mtime_ns >= before - 10**7
    # through touch(1)
    env = dict(os.environ, TZ="UTC")
    subprocess.run(["touch", "-d", "2001-02-03 04:05:06.123456789", str(f)], check=True, env=env)
    st = os.stat(f)
    assert st.st_mtime_ns == st.st_atime_ns == 981173106_123456789
    subprocess.run(["touch", "-m", "-d", "2010-01-01 00:00:00.5", str(f)], check=True, env=env)
    st = os.stat(f)
    assert st.st_mtime_ns == 1262304000_500000000 and st.st_atime_ns == 981173106_123456789
    subprocess.run(["touch", "-a", "-d", "1999-12-31 23:59:59.000000001", str(f)], check=True, env=env)
    st = os.stat(f)
    assert st.st_atime_ns == 946684799_000000001 and st.st_mtime_ns == 1262304000_500000000
    subprocess.run(["touch", str(workdir / "new")], check=True)          # touch creates
    assert os.stat(workdir / "new").st_size == 0
    # a symlink's own times, without touching its target
    os.symlink("f", workdir / "l")
    os.utime(workdir / "l", ns=(3, 4), follow_symlinks=False)
    assert os.lstat(workdir / "l").st_mtime_ns == 4 and os.stat(f).st_mtime_ns == 1262304000_500000000
    assert errno_of(os.utime, workdir / "missing", ns=(1, 1)) == errno.ENOENT


def test_ctime_follows_changes(workdir):
    f = workdir / "f"
    write_file(f, b"x")
    steps = [lambda: os.chmod(f, 0o600), lambda: os.chown(f, 1, 1), lambda: os.link(f, workdir / "g"),
             lambda: os.rename(workdir / "g", workdir / "h"), lambda: os.unlink(workdir / "h"),
             lambda: os.setxattr(f, "user.a", b"1"), lambda: os.truncate(f, 100)]
    for step in steps:
        # the daemon stamps ns times and every step is a round trip to it: ctime must move forward
        c0 = os.stat(f).st_ctime_ns
        step()
        assert os.stat(f).st_ctime_ns > c0, step


def test_mknod(workdir):
    os.mknod(workdir / "reg", stat.S_IFREG | 0o640)
    st = os.stat(workdir / "reg")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 0
    os.mknod(workdir / "reg0", 0o600)             # no type given means regular
    assert stat.S_ISREG(os.stat(workdir / "reg0").st_mode)
    os.mknod(workdir / "fifo", stat.S_IFIFO | 0o666)
    st = os.stat(workdir / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644      # umask 022
    os.mkfifo(workdir / "fifo2", 0o600)
    assert stat.S_ISFIFO(os.stat(workdir / "fifo2").st_mode)
    # a fifo on the mount is a working pipe
    fd = os.open(workdir / "fifo", os.O_RDWR)
    try:
        os.write(fd, b"through the pipe")
        assert os.read(fd, 100) == b"through the pipe"
    finally:
        os.close(fd)
    assert os.stat(workdir / "fifo").st_size == 0
    if os.geteuid() == 0:
        os.mknod(workdir / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(workdir / "blk", stat.S_IFBLK | 0o600, os.makedev(8, 17))
        c, b = os.stat(workdir / "chr"), os.stat(workdir / "blk")
        assert stat.S_ISCHR(c.st_mode) and (os.major(c.st_rdev), os.minor(c.st_rdev)) == (1, 3)
        assert stat.S_ISBLK(b.st_mode) and (os.major(b.st_rdev), os.minor(b.st_rdev)) == (8, 17)
        # the mount is nodev: the node exists but cannot be opened as a device
        assert errno_of(os.open, workdir / "chr", os.O_RDONLY) == errno.EACCES
    assert errno_of(os.mknod, workdir / "reg", stat.S_IFREG | 0o600) == errno.EEXIST
    assert errno_of(os.mknod, workdir / "nodir" / "x", stat.S_IFREG | 0o600) == errno.ENOENT
    assert errno_of(os.mkfifo, workdir / "reg" / "x") == errno.ENOTDIR


# -- directories ---------------------------------------------------------------------------------
def test_mkdir_rmdir(workdir):
    d = workdir / "d"
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_nlink == 2
    assert os.stat(workdir).st_nlink == 3
    assert errno_of(os.mkdir, d) == errno.EEXIST
    assert errno_of(os.mkdir, workdir / "nodir" / "x") == errno.ENOENT
    os.mkdir(d / "sub")
    write_file(d / "file", b"")
    assert os.stat(d).st_nlink == 3
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, d / "file") == errno.ENOTDIR
    assert errno_of(os.rmdir, d / "missing") == errno.ENOENT
    assert errno_of(os.rmdir, f"{d}/sub/.") == errno.EINVAL
    os.rmdir(d / "sub")
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    os.unlink(d / "file")
    os.rmdir(d)
    assert os.stat(workdir).st_nlink == 2
    assert errno_of(os.stat, d) == errno.ENOENT
    # a set-group-ID directory hands its group and the bit down
    os.mkdir(workdir / "g")
    os.chown(workdir / "g", 0, 4321)
    os.chmod(workdir / "g", 0o2775)
    os.mkdir(workdir / "g" / "sub")
    write_file(workdir / "g" / "f", b"")
    assert os.stat(workdir / "g" / "sub").st_gid == 4321
    assert os.stat(workdir / "g" / "sub").st_mode & stat.S_ISGID
    assert os.stat(workdir / "g" / "f").st_gid == 4321


def test_removed_cwd(workdir):
    d = workdir / "gone"
    os.mkdir(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert errno_of(os.open, "x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd) == errno.ENOENT
        assert os.listdir(fd) == []
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_unlink(workdir):
    f = workdir / "f"
    write_file(f, b"data")
    os.link(f, workdir / "g")
    assert os.stat(f).st_nlink == 2
    os.unlink(f)
    assert errno_of(os.stat, f) == errno.ENOENT
    assert os.stat(workdir / "g").st_nlink == 1 and read_file(workdir / "g") == b"data"
    assert errno_of(os.unlink, f) == errno.ENOENT
    os.mkdir(workdir / "d")
    assert errno_of(os.unlink, workdir / "d") == errno.EISDIR
    assert errno_of(os.unlink, workdir / "g" / "x") == errno.ENOTDIR
    os.symlink("g", workdir / "l")
    os.unlink(workdir / "l")                       # removes the link, not its target
    assert read_file(workdir / "g") == b"data"
    assert sorted(os.listdir(workdir)) == ["d", "g"]


# -- rename --------------------------------------------------------------------------------------
def test_rename(workdir):
    a, b = workdir / "a", workdir / "b"
    write_file(a, b"A")
    write_file(b, b"B")
    ino_a = os.stat(a).st_ino
    os.rename(a, b)                                # replaces b
    assert read_file(b) == b"A" and os.stat(b).st_ino == ino_a
    assert sorted(os.listdir(workdir)) == ["b"]
    os.rename(b, b)                                # to itself: nothing happens
    os.link(b, workdir / "c")
    os.rename(b, workdir / "c")                    # two links of one inode: both stay
    assert sorted(os.listdir(workdir)) == ["b", "c"] and os.stat(b).st_nlink == 2
    os.unlink(workdir / "c")
    # directories
    os.makedirs(workdir / "d1" / "sub")
    os.mkdir(workdir / "d2")
    os.mkdir(workdir / "empty")
    assert errno_of(os.rename, workdir / "d1", workdir / "d1" / "sub" / "x") == errno.EINVAL
    assert errno_of(os.rename, b, workdir / "d2") == errno.EISDIR
    assert errno_of(os.rename, workdir / "d2", b) == errno.ENOTDIR
    assert errno_of(os.rename, workdir / "d2", workdir / "d1") == errno.ENOTEMPTY
    assert errno_of(os.rename, workdir / "missing", workdir / "x") == errno.ENOENT
    assert errno_of(os.rename, b, workdir / "nodir" / "x") == errno.ENOENT
    os.rename(workdir / "d2", workdir / "empty")   # over an empty directory
    assert sorted(os.listdir(workdir)) == ["b", "d1", "empty"]
    assert os.stat(workdir).st_nlink == 4
    # across directories: the parents' link counts follow the moved directory
    os.rename(workdir / "d1" / "sub", workdir / "empty" / "moved")
    assert os.stat(workdir / "d1").st_nlink == 2 and os.stat(workdir / "empty").st_nlink == 3
    assert os.stat(workdir / "empty" / "moved" / "..").st_ino == os.stat(workdir / "empty").st_ino
    os.rename(b, workdir / "d1" / "file")
    assert read_file(workdir / "d1" / "file") == b"A"
    # a file replaced by rename is gone, its blocks with it, unless another name holds it
    write_file(workdir / "keep", b"K")
    os.link(workdir / "keep", workdir / "keep2")
    os.rename(workdir / "d1" / "file", workdir / "keep")
    assert read_file(workdir / "keep2") == b"K" and os.stat(workdir / "keep2").st_nlink == 1


def test_rename_noreplace(workdir):
    a, b = workdir / "a", workdir / "b"
    write_file(a, b"A")
    write_file(b, b"B")
    assert errno_of(renameat2, a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert read_file(a) == b"A" and read_file(b) == b"B"
    renameat2(a, workdir / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(workdir)) == ["b", "c"]
    assert errno_of(renameat2, workdir / "missing", workdir / "x", RENAME_NOREPLACE) == errno.ENOENT
    assert errno_of(renameat2, b, workdir / "c", RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL


def test_rename_exchange(workdir):
    os.mkdir(workdir / "p1")
    os.mkdir(workdir / "p2")
    write_file(workdir / "p1" / "f", b"file")
    os.makedirs(workdir / "p2" / "d" / "inner")
    f_ino, d_ino = os.stat(workdir / "p1" / "f").st_ino, os.stat(workdir / "p2" / "d").st_ino
    renameat2(workdir / "p1" / "f", workdir / "p2" / "d", RENAME_EXCHANGE)
    assert os.stat(workdir / "p1" / "f").st_ino == d_ino and os.path.isdir(workdir / "p1" / "f")
    assert os.stat(workdir / "p2" / "d").st_ino == f_ino and read_file(workdir / "p2" / "d") == b"file"
    assert os.listdir(workdir / "p1" / "f") == ["inner"]
    # the directory moved from p2 to p1: the parents' link counts and '..' follow
    assert os.stat(workdir / "p1").st_nlink == 3 and os.stat(workdir / "p2").st_nlink == 2
    assert os.stat(workdir / "p1" / "f" / "..").st_ino == os.stat(workdir / "p1").st_ino
    # two files in one directory
    write_file(workdir / "x", b"X")
    write_file(workdir / "y", b"Y")
    renameat2(workdir / "x", workdir / "y", RENAME_EXCHANGE)
    assert read_file(workdir / "x") == b"Y" and read_file(workdir / "y") == b"X"
    assert errno_of(renameat2, workdir / "x", workdir / "missing", RENAME_EXCHANGE) == errno.ENOENT
    # a directory cannot be exchanged with its own descendant
    assert errno_of(renameat2, workdir / "p1", workdir / "p1" / "f" / "inner", RENAME_EXCHANGE) == errno.EINVAL


# -- links ---------------------------------------------------------------------------------------
def test_link(workdir):
    f = workdir / "f"
    write_file(f, b"one")
    os.mkdir(workdir / "d")
    os.link(f, workdir / "d" / "g")
    st, sg = os.stat(f), os.stat(workdir / "d" / "g")
    assert st.st_ino == sg.st_ino and st.st_nlink == sg.st_nlink == 2
    with open(workdir / "d" / "g", "ab") as fh:
        fh.write(b" two")
    assert read_file(f) == b"one two"
    assert errno_of(os.link, workdir / "d", workdir / "dlink") == errno.EPERM
    assert errno_of(os.link, f, workdir / "d" / "g") == errno.EEXIST
    assert errno_of(os.link, workdir / "missing", workdir / "x") == errno.ENOENT
    os.symlink("f", workdir / "l")
    os.link(workdir / "l", workdir / "l2", follow_symlinks=False)     # a hard link to the symlink
    assert os.lstat(workdir / "l2").st_nlink == 2 and os.readlink(workdir / "l2") == "f"


def test_symlink_readlink(workdir):
    targets = ["f", "../x/y", "/absolute/path", "dangling", "é ü", "a" * 4095]
    for i, t in enumerate(targets):
        os.symlink(t, workdir / f"l{i}")
        st = os.lstat(workdir / f"l{i}")
        assert stat.S_ISLNK(st.st_mode) and st.st_size == len(t.encode())
        assert os.readlink(workdir / f"l{i}") == t
    write_file(workdir / "f", b"target")
    assert read_file(workdir / "l0") == b"target"
    assert errno_of(os.stat, workdir / "l3") == errno.ENOENT
    assert errno_of(os.readlink, workdir / "f") == errno.EINVAL
    assert errno_of(os.readlink, workdir / "missing") == errno.ENOENT
    assert errno_of(os.symlink, "x", workdir / "l0") == errno.EEXIST
    assert errno_of(os.symlink, "a" * 4096, workdir / "toolong") == errno.ENAMETOOLONG
    # symlink loops
    os.symlink("loop2", workdir / "loop1")
    os.symlink("loop1", workdir / "loop2")
    assert errno_of(os.stat, workdir / "loop1") == errno.ELOOP


# -- open, read, write ---------------------------------------------------------------------------
def test_open_create_excl_trunc(workdir):
    f = workdir / "f"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"first contents")
    os.close(fd)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert errno_of(os.open, f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) == errno.EEXIST
    os.symlink("f", workdir / "l")
    assert errno_of(os.open, workdir / "l", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    # O_CREAT without O_EXCL opens the existing file and keeps its mode and contents
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    assert os.read(fd, 100) == b"first contents"
    os.close(fd)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    # O_TRUNC empties it and frees its blocks
    os.utime(f, ns=(0, 0))
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert read_file(f) == b"x" and os.stat(f).st_mtime_ns > 0
    with open(f, "w") as fh:                       # the shell's `>`
        fh.write("y")
    assert read_file(f) == b"y"
    subprocess.run(["sh", "-c", f"echo shorter > '{f}'; echo 'a much longer line' > '{f}'; echo s > '{f}'"],
                   check=True)
    assert read_file(f) == b"s\n"
    # opening for reading with O_TRUNC as well: Linux truncates (the caller may write)
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    os.close(fd)
    assert os.stat(f).st_size == 0
    assert errno_of(os.open, workdir / "missing", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, workdir, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, f, os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    assert errno_of(os.open, f / "x", os.O_RDONLY | os.O_CREAT, 0o600) == errno.ENOTDIR


def test_o_append(workdir):
    f = workdir / "f"
    write_file(f, b"12345")
    a1 = os.open(f, os.O_WRONLY | os.O_APPEND)
    a2 = os.open(f, os.O_WRONLY | os.O_APPEND)
    plain = os.open(f, os.O_WRONLY)
    try:
        os.lseek(a1, 0, os.SEEK_SET)
        os.write(a1, b"ab")
        os.write(a2, b"cd")
        os.write(plain, b"XY")                      # at offset 0: overwrites, does not append
        os.write(a1, b"ef")
        assert os.lseek(a1, 0, os.SEEK_CUR) == 11
        os.write(plain, b"Z" * 20)                  # grows the file past every appender
        os.write(a2, b"!")
    finally:
        for fd in (a1, a2, plain):
            os.close(fd)
    assert read_file(f) == b"XY" + b"Z" * 20 + b"!"
    subprocess.run(["sh", "-c", f"echo more >> '{f}'"], check=True)
    assert read_file(f).endswith(b"!more\n")


def test_read_write(workdir):
    f = workdir / "f"
    rng = random.Random(7)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        model = bytearray()
        for _ in range(60):
            off = rng.randrange(0, 70000)
            data = rng.randbytes(rng.choice([1, 17, BS - 1, BS, BS + 1, 3 * BS + 5, 20000]))
            assert os.pwrite(fd, data, off) == len(data)
            if off > len(model):
                model += bytes(off - len(model))
            model[off:off + len(data)] = data
            assert os.fstat(fd).st_size == len(model)
            roff, rlen = rng.randrange(0, len(model) + 10), rng.randrange(0, 30000)
            assert os.pread(fd, rlen, roff) == bytes(model[roff:roff + rlen])
        assert os.pread(fd, 10, len(model)) == b""
        assert os.pread(fd, 10, len(model) + 5000) == b""
        os.lseek(fd, 0, os.SEEK_SET)
        assert read_all(fd) == bytes(model)
    finally:
        os.close(fd)
    # a big write in one go, and a sparse file
    big = rng.randbytes(3 << 20)
    write_file(workdir / "big", big)
    assert read_file(workdir / "big") == big
    assert os.stat(workdir / "big").st_blocks == len(big) // 512
    fd = os.open(workdir / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", 50 << 20)
        assert os.pread(fd, 3, 50 << 20) == b"end"
        assert os.pread(fd, 100, 10 << 20) == bytes(100)
        st = os.fstat(fd)
        assert st.st_size == (50 << 20) + 3 and st.st_blocks <= 8
    finally:
        os.close(fd)
    # read and write need the right open mode
    fd = os.open(workdir / "big", os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EBADF
    finally:
        os.close(fd)
    fd = os.open(workdir / "big", os.O_WRONLY)
    try:
        assert errno_of(os.read, fd, 1) == errno.EBADF
    finally:
        os.close(fd)
    dfd = os.open(workdir, os.O_RDONLY)
    try:
        assert errno_of(os.read, dfd, 1) == errno.EISDIR
    finally:
        os.close(dfd)


def read_all(fd) -> bytes:
    out = []
    while chunk := os.read(fd, 1 << 20):
        out.append(chunk)
    return b"".join(out)


def test_fsync(workdir, fs):
    f = workdir / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 100, 0) == b"durable"
    finally:
        os.close(fd)
    dfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    subprocess.run(["sync", str(f)], check=True)
    subprocess.run(["sync", "-f", str(f)], check=True)


# -- readdir -------------------------------------------------------------------------------------
def test_readdir_large(workdir):
    names = {f"entry-{i:05d}-" + "x" * (i % 200) for i in range(1200)}
    for n in names:
        os.close(os.open(workdir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(workdir)
    assert len(listed) == len(set(listed)) == len(names) and set(listed) == names
    with os.scandir(workdir) as it:
        kinds = {e.name: e.is_file(follow_symlinks=False) for e in it}
    assert all(kinds.values()) and set(kinds) == names


def _ls_a(d) -> list[tuple[int, str]]:
    """(inode, name) of every entry `ls -a` lists, "." and ".." included."""
    out = subprocess.run(["ls", "-a1i", str(d)], check=True, capture_output=True, text=True).stdout
    return [(int(ino), name) for ino, name in (line.split(None, 1) for line in out.splitlines())]


def test_readdir_lists_dot_and_dotdot(workdir):
    sub = workdir / "sub"
    sub.mkdir()
    (sub / "f").write_bytes(b"x")
    assert _ls_a(sub) == [(sub.stat().st_ino, "."), (workdir.stat().st_ino, ".."), ((sub / "f").stat().st_ino, "f")]
    root = workdir
    while os.path.ismount(root) is False:
        root = root.parent
    listed = dict((name, ino) for ino, name in _ls_a(root))
    assert listed["."] == root.stat().st_ino and listed[".."] == root.parent.stat().st_ino   # as on any mount
    for i in range(1200):                     # a listing over many kernel requests: each name once
        os.close(os.open(sub / f"e{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    names = [name for _, name in _ls_a(sub)]
    assert names.count(".") == names.count("..") == 1 and len(names) == len(set(names)) == 1203


def test_readdir_concurrent_changes(workdir):
    stable = {f"stable-{i:04d}" for i in range(300)}
    victims = [f"victim-{i:04d}" for i in range(300)]
    for n in list(stable) + victims:
        os.close(os.open(workdir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    rng = random.Random(3)
    ever = set(stable) | set(victims)
    seen: list[str] = []
    created = 0
    with os.scandir(workdir) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i % 7 == 0:                        # churn while the listing is in progress
                for _ in range(5):
                    if victims:
                        os.unlink(workdir / victims.pop(rng.randrange(len(victims))))
                    n = f"new-{created:04d}"
                    created += 1
                    ever.add(n)
                    os.close(os.open(workdir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    dups = {n for n in seen if seen.count(n) > 1}
    assert not dups, f"entries listed twice: {sorted(dups)[:10]}"
    assert stable <= set(seen), f"entries that never changed were missed: {sorted(stable - set(seen))[:10]}"
    assert set(seen) <= ever
    assert set(os.listdir(workdir)) == stable | set(victims) | {f"new-{i:04d}" for i in range(created)}


def test_readdir_while_another_thread_changes(workdir):
    stable = {f"s{i:04d}" for i in range(300)}
    for n in stable:
        os.close(os.open(workdir / n, os.O_CREAT | os.O_WRONLY, 0o644))
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn():
        i = 0
        try:
            while not stop.is_set():
                p = workdir / f"t{i % 50}"
                if i % 100 < 50:
                    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
                else:
                    os.unlink(p)
                if i % 13 == 0:
                    os.rename(workdir / "s0000", workdir / "s0000")
                i += 1
        except BaseException as e:        # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(30):
            listed = os.listdir(workdir)
            assert len(listed) == len(set(listed)), "an entry was listed twice"
            assert stable <= set(listed)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors


# -- statfs --------------------------------------------------------------------------------------
def test_statfs_counts(workdir):
    def snap():
        os.sync()
        return os.statvfs(workdir)

    s0 = snap()
    assert s0.f_bsize == s0.f_frsize == BS and s0.f_namemax == 255
    assert s0.f_blocks == (256 << 20) // BS, "a store limited to 256 MiB reports that size"
    assert 0 < s0.f_bfree <= s0.f_blocks and s0.f_bavail <= s0.f_bfree
    assert s0.f_files > s0.f_ffree > 0
    # 4 MiB of data takes 1024 blocks
    fd = os.open(workdir / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, random.Random(0).randbytes(4 << 20))
        os.fsync(fd)
    finally:
        os.close(fd)
    s1 = snap()
    assert s1.f_blocks == s0.f_blocks
    assert s0.f_bfree - s1.f_bfree == 1024, (s0, s1)
    # ten more inodes
    for i in range(10):
        os.mkdir(workdir / f"d{i}")
    s2 = snap()
    assert (s2.f_files - s2.f_ffree) - (s1.f_files - s1.f_ffree) == 10, (s1, s2)
    # deleting gives the blocks and inodes back
    os.unlink(workdir / "f")
    for i in range(10):
        os.rmdir(workdir / f"d{i}")
    s3 = snap()
    assert s3.f_bfree == s0.f_bfree, (s0, s3)
    assert s3.f_files - s3.f_ffree == s0.f_files - s0.f_ffree
    # df(1) agrees
    out = subprocess.run(["df", "-B4096", "--output=size", str(workdir)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[-1]) == s0.f_blocks


# -- extended attributes -------------------------------------------------------------------------
def own_xattrs(path, follow_symlinks=True) -> list[str]:
    """The names a test set itself (virtual `user.reflinkfs.*` names are the filesystem's own)."""
    return sorted(n for n in os.listxattr(path, follow_symlinks=follow_symlinks)
                  if not n.startswith("user.reflinkfs."))


def test_xattrs(workdir):
    f = workdir / "f"
    write_file(f, b"x")
    assert own_xattrs(f) == []
    assert errno_of(os.getxattr, f, "user.missing") == errno.ENODATA
    os.setxattr(f, "user.a", b"alpha")
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user.bin", bytes(range(256)) * 10)
    assert os.getxattr(f, "user.a") == b"alpha"
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user.bin") == bytes(range(256)) * 10
    assert own_xattrs(f) == ["user.a", "user.bin", "user.empty"]
    # XATTR_CREATE / XATTR_REPLACE
    assert errno_of(os.setxattr, f, "user.a", b"new", os.XATTR_CREATE) == errno.EEXIST
    assert os.getxattr(f, "user.a") == b"alpha"
    assert errno_of(os.setxattr, f, "user.b", b"new", os.XATTR_REPLACE) == errno.ENODATA
    assert errno_of(os.getxattr, f, "user.b") == errno.ENODATA
    os.setxattr(f, "user.a", b"replaced", os.XATTR_REPLACE)
    os.setxattr(f, "user.c", b"created", os.XATTR_CREATE)
    assert os.getxattr(f, "user.a") == b"replaced" and os.getxattr(f, "user.c") == b"created"
    # buffer sizes: 0 asks for the size, a small buffer is ERANGE
    assert len(getxattr_sized(f, "user.a", 0)) == len(b"replaced")
    assert getxattr_sized(f, "user.a", 8) == b"replaced"
    assert errno_of(getxattr_sized, f, "user.a", 3) == errno.ERANGE
    need = listxattr_sized(f, 0)
    assert need >= len(b"user.a\0user.bin\0user.c\0user.empty\0")
    assert listxattr_sized(f, need) == need
    assert errno_of(listxattr_sized, f, 4) == errno.ERANGE
    # remove
    os.removexattr(f, "user.a")
    assert errno_of(os.getxattr, f, "user.a") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.a") == errno.ENODATA
    assert own_xattrs(f) == ["user.bin", "user.c", "user.empty"]
    # limits the kernel enforces: name length, value size
    assert errno_of(os.setxattr, f, "user." + "n" * 251, b"v") == errno.ERANGE
    os.setxattr(f, "user." + "n" * 250, b"v")
    assert errno_of(os.setxattr, f, "user.big", b"v" * 65537) == errno.E2BIG
    os.setxattr(f, "user.big", b"v" * 65536)
    assert os.getxattr(f, "user.big") == b"v" * 65536
    # directories carry them too; user.* on a symlink is refused by the kernel
    os.mkdir(workdir / "d")
    os.setxattr(workdir / "d", "user.dir", b"1")
    assert own_xattrs(workdir / "d") == ["user.dir"]
    os.symlink("f", workdir / "l")
    assert errno_of(os.setxattr, workdir / "l", "user.x", b"1", follow_symlinks=False) == errno.EPERM
    assert os.getxattr(workdir / "l", "user.bin") == bytes(range(256)) * 10       # follows the link
    # hard links share them; an unlinked-and-recreated name does not inherit them
    os.link(f, workdir / "g")
    assert os.getxattr(workdir / "g", "user.c") == b"created"
    os.unlink(workdir / "g")
    write_file(workdir / "g", b"")
    assert own_xattrs(workdir / "g") == []
    assert errno_of(os.getxattr, workdir / "missing", "user.a") == errno.ENOENT


def test_acl_xattrs_are_checked_and_other_system_xattrs_refused(workdir):
    """POSIX ACLs are supported (tests/mount/test_acl.py): an ACL the mode says all of sets the mode and
    is not stored, as on ext4; a malformed one is refused, as is a default ACL on a file and any other
    system.* attribute."""
    f = workdir / "f"
    write_file(f, b"x", 0o600)
    # the ACL `cp -a` writes for mode 0644: user::rw- group::r-- other::r--
    acl = bytes.fromhex("02000000" "01000600ffffffff" "04000400ffffffff" "20000400ffffffff")
    os.setxattr(f, "system.posix_acl_access", acl)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert errno_of(os.getxattr, f, "system.posix_acl_access") == errno.ENODATA
    assert own_xattrs(f) == []
    assert errno_of(os.setxattr, f, "system.posix_acl_access", acl[:-1]) == errno.EINVAL
    assert errno_of(os.setxattr, f, "system.posix_acl_default", acl) == errno.EACCES
    assert errno_of(os.setxattr, f, "system.other", b"v") == errno.EOPNOTSUPP
    # and cp -a copies the mode
    os.chmod(f, 0o754)
    subprocess.run(["cp", "-a", str(f), str(workdir / "copy")], check=True)
    assert stat.S_IMODE(os.stat(workdir / "copy").st_mode) == 0o754


# -- names ---------------------------------------------------------------------------------------
def test_name_too_long(workdir):
    long = "n" * 256
    ok = "n" * 255
    write_file(workdir / "f", b"")
    os.mkdir(workdir / "d")
    cases = [
        (os.open, (workdir / long, os.O_CREAT | os.O_WRONLY, 0o644)),
        (os.stat, (workdir / long,)),
        (os.mkdir, (workdir / long,)),
        (os.mknod, (workdir / long, stat.S_IFIFO | 0o644)),
        (os.symlink, ("f", workdir / long)),
        (os.link, (workdir / "f", workdir / long)),
        (os.rename, (workdir / "f", workdir / long)),
        (os.rename, (workdir / "d", workdir / long)),
        (os.unlink, (workdir / long,)),
        (os.rmdir, (workdir / long,)),
    ]
    for fn, args in cases:
        assert errno_of(fn, *args) == errno.ENAMETOOLONG, fn.__name__
    assert sorted(os.listdir(workdir)) == ["d", "f"]
    write_file(workdir / ok, b"max")
    os.mkdir(workdir / ("d" * 255))
    os.rename(workdir / "f", workdir / ("r" * 255))
    assert sorted(os.listdir(workdir)) == sorted(["d" * 255, "d", ok, "r" * 255])
    assert read_file(workdir / ok) == b"max"
    # names with every byte but '/' and NUL
    odd = bytes(b for b in range(1, 256) if b != ord("/"))[:200]
    p = os.path.join(os.fsencode(workdir), odd)
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    assert odd in os.listdir(os.fsencode(workdir))


# -- unlinked while open -------------------------------------------------------------------------
def test_unlinked_file_lives_until_last_close(workdir):
    f = workdir / "f"
    data = random.Random(5).randbytes(2 << 20)
    write_file(f, data)
    os.sync()
    free_with_file = os.statvfs(workdir).f_bfree
    fd1 = os.open(f, os.O_RDWR)
    fd2 = os.open(f, os.O_RDONLY)
    try:
        os.unlink(f)
        assert "f" not in os.listdir(workdir)
        assert errno_of(os.stat, f) == errno.ENOENT
        assert os.fstat(fd1).st_nlink == 0
        assert os.pread(fd1, len(data) + 1, 0) == data
        os.pwrite(fd1, b"still writable", 100)
        assert os.pread(fd2, 14, 100) == b"still writable"
        os.fsync(fd1)
        write_file(f, b"a new file by the old name")     # does not disturb the open one
        assert os.pread(fd2, 4, 0) == data[:4]
        os.close(fd1)
        fd1 = -1
        assert os.pread(fd2, len(data), 0)[:100] == data[:100]
        assert os.statvfs(workdir).f_bfree < free_with_file
    finally:
        if fd1 >= 0:
            os.close(fd1)
        os.close(fd2)
    os.unlink(f)
    os.sync()
    # the last close released the blocks (the replacement file is gone too)
    assert os.statvfs(workdir).f_bfree >= free_with_file + len(data) // BS
