"""What was written survives an unmount and a remount, exactly; what was fsynced survives a crash.

Compared after a remount: contents, sizes, allocated blocks (sparse files stay sparse), modes, owners,
times in ns (atime, mtime, ctime), xattrs, symlink targets, device numbers, nlink, hard-link groups
and inode numbers.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import stat

from mountutil import assert_fsck_clean, diff_snapshots, fusermount, is_mounted, snapshot, wait_for


def populate(root) -> None:
    rng = random.Random(42)
    os.makedirs(root / "a" / "b" / "c")
    os.mkdir(root / "empty", 0o700)
    sizes = [0, 1, 4095, 4096, 4097, 65537, (1 << 20) + 3, 3 * 4096]
    for i, n in enumerate(sizes):
        (root / "a" / f"file{i}").write_bytes(rng.randbytes(n))
    (root / "a" / "b" / "text").write_text("line\n" * 5000)
    # sparse: a hole at the start, data in the middle, a hole at the end (from truncate)
    with open(root / "sparse", "wb") as f:
        f.seek(10 << 20)
        f.write(b"data in the middle" * 300)
        f.truncate(20 << 20)
    with open(root / "sparse-head", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"tail")
    os.symlink("a/file1", root / "link-rel")
    os.symlink("/does/not/exist", root / "link-dangling")
    os.symlink("x" * 4095, root / "link-long")
    os.symlink("../../empty", root / "a" / "b" / "link-up")
    os.link(root / "a" / "file5", root / "hard1")
    os.link(root / "a" / "file5", root / "a" / "b" / "c" / "hard2")
    os.mkfifo(root / "fifo", 0o620)
    os.mknod(root / "chardev", stat.S_IFCHR | 0o600, os.makedev(1, 7))
    for path, mode in [("a/file2", 0o755), ("a/file3", 0o4711), ("a/file4", 0o2750), ("a/b", 0o1777),
                       ("a/file6", 0o000), ("a/b/c", 0o751)]:
        os.chmod(root / path, mode)
    os.chown(root / "a" / "file7", 1001, 2002)
    os.chown(root / "link-rel", 3003, 4004, follow_symlinks=False)
    os.setxattr(root / "a" / "file1", "user.one", b"1")
    os.setxattr(root / "a" / "file1", "user.binary", bytes(range(256)) * 4)
    os.setxattr(root / "a" / "file1", "user.empty", b"")
    os.setxattr(root / "a" / "b", "user.dir", b"on a directory")
    os.setxattr(root / "hard1", "user.shared", b"seen through every link")
    os.setxattr(root, "user.root", b"on the root")
    # times last (creating entries changes the directories' times), children before parents
    t = 1_600_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            t += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(t, t + 500), follow_symlinks=False)
    os.utime(root, ns=(123, 456))


def root_attrs(mnt) -> dict:
    st = os.stat(mnt)
    return {"mode": st.st_mode, "nlink": st.st_nlink, "uid": st.st_uid, "atime": st.st_atime_ns,
            "mtime": st.st_mtime_ns, "xattrs": {n: os.getxattr(mnt, n) for n in os.listxattr(mnt)
                                                 if not n.startswith("user.reflinkfs.")}}


def full_snapshot(mnt) -> dict:
    s = snapshot(mnt, times=True, exact=True)
    s["<root>"] = root_attrs(mnt)
    return s


def test_everything_survives_remount(mounts):
    store = mounts.store()
    m = mounts.mount(store)
    populate(m.mnt)
    before = full_snapshot(m.mnt)
    assert before["sparse"]["blocks"] <= 16 and before["a/file6"]["mode"] == "----------"
    assert before["<hardlinks>"] == [["a/b/c/hard2", "a/file5", "hard1"]]
    m.unmount()

    # the backgrounding command this time, and then with no cache at all
    for options in (["--cache", "inode"], ["--cache", "none", "--kernel-cache"]):
        m = mounts.mount(store, m.mnt, foreground=False, options=options)
        after = full_snapshot(m.mnt)
        assert after == before, f"differs after remount with {options}:\n" + diff_snapshots(before, after)
        m.unmount()
        assert_fsck_clean(store)


def test_changes_after_remount_persist(mounts):
    """A second session of changes on a remounted store (overwrite, truncate, unlink, rename)."""
    store = mounts.store()
    m = mounts.mount(store)
    populate(m.mnt)
    m.unmount()
    m = mounts.mount(store, m.mnt)
    with open(m.path("a", "file6"), "r+b") as f:
        f.seek(3)
        f.write(b"overwritten")
    os.truncate(m.path("a", "file5"), 10)
    os.unlink(m.path("a", "file0"))
    os.rename(m.path("a", "b"), m.path("moved"))
    os.removexattr(m.path("hard1"), "user.shared")
    expect = full_snapshot(m.mnt)
    m.unmount()
    m = mounts.mount(store, m.mnt)
    got = full_snapshot(m.mnt)
    assert got == expect, diff_snapshots(expect, got)
    assert got["hard1"]["size"] == 10 and got["hard1"]["xattrs"] == {}
    m.unmount()


def test_fsynced_data_survives_a_crash(mounts):
    """SIGKILL the daemon: what was fsynced is there after a remount, and the store checks clean
    (including a file that was unlinked while open at the time of the crash)."""
    store = mounts.store()
    m = mounts.mount(store, options=["--commit-interval", "3600"])
    data = random.Random(1).randbytes(300_000)
    fd = os.open(m.path("durable"), os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.mkdir(m.path("dir"))
    os.setxattr(m.path("dir"), "user.k", b"v")
    dfd = os.open(m.path("dir"), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    orphan = os.open(m.path("orphan"), os.O_RDWR | os.O_CREAT, 0o600)
    os.write(orphan, b"x" * 100_000)
    os.unlink(m.path("orphan"))
    os.fsync(orphan)                                      # commits: the store now holds an orphan
    os.write(fd := os.open(m.path("durable"), os.O_WRONLY | os.O_APPEND), b"not synced")
    os.close(fd)

    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_daemon_exit(30)
    try:
        os.close(orphan)                                  # the fd is closed even when flush fails
    except OSError as e:
        assert e.errno == errno.ENOTCONN
    assert fusermount(m.mnt) == 0
    wait_for(lambda: not is_mounted(m.mnt), 10, "the dead mount to go")

    m = mounts.mount(store, m.mnt)
    got = m.path("durable").read_bytes()
    assert got in (data, data + b"not synced"), "the fsynced contents are gone"
    assert stat.S_IMODE(os.stat(m.path("durable")).st_mode) == 0o640
    assert os.getxattr(m.path("dir"), "user.k") == b"v"
    assert sorted(os.listdir(m.mnt)) == ["dir", "durable"]
    m.unmount()
    assert_fsck_clean(store)
