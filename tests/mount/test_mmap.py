"""Shared mappings (MAP_SHARED) on a real mount: coherent with read(2), write(2) and every other path,
durable with msync + fsync, and SQLite in WAL mode (whose -shm file is a shared mapping) across
connections, processes and a crash of the daemon.

The mount negotiates FUSE_CAP_DIRECT_IO_ALLOW_MMAP; files stay direct_io for read(2) and write(2). A
mapped file's pages live in the kernel's page cache of that inode, and the kernel keeps them coherent
with direct I/O of the same inode (it writes dirty pages back before a direct read or write of their
range, and drops the pages a direct write covers). What the daemon changes on its own (a clone into the
file) it tells the kernel about.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from mountutil import _libc, assert_fsck_clean, fusermount, is_mounted, run_cli, wait_for

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
PAGE = mmap.PAGESIZE


def punch_hole(fd: int, off: int, n: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(off), ctypes.c_long(n)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_the_mount_negotiates_shared_mappings(fs):
    st = json.loads(os.getxattr(fs.mnt, "user.reflinkfs.status"))
    assert st["negotiated"]["direct_io_allow_mmap"] is True
    assert st["negotiated"]["libfuse"].split(".")[:2] >= ["3", "17"]


def test_shared_mapping_is_coherent_with_read_and_write(workdir):
    p = workdir / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    reader, writer = os.open(p, os.O_RDONLY), os.open(p, os.O_WRONLY)
    try:
        os.write(fd, b"a" * 3 * PAGE)
        with mmap.mmap(fd, 3 * PAGE) as m:                  # MAP_SHARED, read and write
            m[10:15] = b"HELLO"                             # a store through the mapping ...
            assert os.pread(reader, 5, 10) == b"HELLO"      # ... read(2) elsewhere sees it, no msync
            os.pwrite(writer, b"WORLD", PAGE + 7)
            assert m[PAGE + 7:PAGE + 12] == b"WORLD"        # write(2), then the mapping sees it
            with mmap.mmap(reader, 0, prot=mmap.PROT_READ) as ro:   # read-only, shared, the whole file
                assert ro[10:15] == b"HELLO" and ro[PAGE + 7:PAGE + 12] == b"WORLD"
        assert p.read_bytes()[:15] == b"a" * 10 + b"HELLO"
    finally:
        for f in (fd, reader, writer):
            os.close(f)


def test_write_back_through_an_append_handle_lands_at_the_pages_offset(workdir):
    """The kernel writes a shared mapping's dirty pages back through a handle that was mapped, an
    O_APPEND one too: the data belongs at the pages' offset, not at the end of the file."""
    p = workdir / "f"
    p.write_bytes(b"x" * 2 * PAGE)
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, 2 * PAGE) as m:
            m[PAGE:PAGE + 4] = b"MMAP"
            m.flush()                                     # msync: written back through fd
        os.write(fd, b"tail")                             # and an append still appends
    finally:
        os.close(fd)
    assert p.read_bytes() == b"x" * PAGE + b"MMAP" + b"x" * (PAGE - 4) + b"tail"


def test_append_goes_to_the_end_after_a_clone_changed_the_size(workdir):
    src, dst = workdir / "src", workdir / "dst"
    src.write_bytes(b"s" * 10000)
    dst.write_bytes(b"d" * 100)
    app = os.open(dst, os.O_WRONLY | os.O_APPEND)
    try:
        os.stat(dst)                                      # the kernel has dst's size cached: 100
        r = run_cli("clone", "--force", src, dst)
        assert r.returncode == 0, r.stderr
        os.write(app, b"END")
    finally:
        os.close(app)
    assert dst.read_bytes() == b"s" * 10000 + b"END"


def test_clone_takes_a_mappings_dirty_pages_and_the_mapping_sees_the_clone(workdir):
    """The clone request itself (what `reflinkfs clone` sends), with both files already open: the
    clone has src's dirty mapped page, and dst's mapping, faulted in before the clone, shows the clone."""
    src, dst = workdir / "src", workdir / "dst"
    src.write_bytes(b"s" * 2 * PAGE)
    dst.write_bytes(b"d" * 2 * PAGE)
    sfd, dfd = os.open(src, os.O_RDWR), os.open(dst, os.O_RDWR)
    try:
        with mmap.mmap(sfd, 2 * PAGE) as sm, mmap.mmap(dfd, 2 * PAGE) as dm:
            sm[0:5] = b"DIRTY"                            # not written back yet
            assert dm[0:1] == b"d"                        # dst's page is in the page cache
            os.setxattr(dfd, "user.reflinkfs.clone-from", str(os.fstat(sfd).st_ino).encode())
            assert dm[0:6] == b"DIRTYs"                   # the clone has src's dirty page, dst shows it
            assert os.fstat(dfd).st_size == 2 * PAGE
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == b"DIRTY" + b"s" * (2 * PAGE - 5)


class Model:
    """One file of at most `cap` bytes driven through a fixed MAP_SHARED mapping, read(2), write(2),
    truncate, punch hole, copy_file_range and MAP_PRIVATE mappings, checked byte for byte after each step."""

    def __init__(self, path, src_path, cap: int, rng: random.Random):
        self.rng, self.cap = rng, cap
        self.data = bytearray(rng.randbytes(cap))
        path.write_bytes(self.data)
        self.src = rng.randbytes(cap)
        src_path.write_bytes(self.src)
        self.fd = os.open(path, os.O_RDWR)
        self.sfd = os.open(src_path, os.O_RDONLY)
        try:
            self.map = mmap.mmap(self.fd, cap)
        except OSError:
            os.close(self.fd)
            os.close(self.sfd)
            raise

    def close(self):
        self.map.close()
        os.close(self.fd)
        os.close(self.sfd)

    def span(self, limit: int) -> tuple[int, int]:
        off = self.rng.randrange(limit)
        n = min(limit - off, self.rng.choice([1, 7, PAGE - 1, PAGE, PAGE + 3, 3 * PAGE, 9000]))
        return off, n

    def step(self) -> str:
        size = len(self.data)
        ops = ["pwrite", "truncate", "punch", "copy", "private"] + (["map_write", "map_read"] * 2 if size else [])
        op = self.rng.choice(ops)
        if op == "pwrite":
            off, n = self.span(self.cap)
            buf = self.rng.randbytes(n)
            assert os.pwrite(self.fd, buf, off) == n
            if off > size:
                self.data += bytes(off - size)
            self.data[off:off + n] = buf
        elif op == "map_write":                       # within the file: a page past EOF is SIGBUS
            off, n = self.span(size)
            buf = self.rng.randbytes(n)
            self.map[off:off + n] = buf
            self.data[off:off + n] = buf
        elif op == "map_read":
            off, n = self.span(size)
            assert self.map[off:off + n] == self.data[off:off + n], f"mapping at {off}+{n}"
        elif op == "truncate":
            new = self.rng.choice([0, self.rng.randrange(self.cap + 1), PAGE * self.rng.randrange(1, self.cap // PAGE)])
            os.ftruncate(self.fd, new)
            self.data = self.data[:new] + bytes(max(0, new - size))
        elif op == "punch":
            off, n = self.span(self.cap)
            punch_hole(self.fd, off, n)
            end = min(off + n, size)
            if off < end:
                self.data[off:end] = bytes(end - off)
        elif op == "copy":
            off_src, n = self.span(self.cap)
            off_dst = self.rng.choice([off_src, self.rng.randrange(self.cap)])   # block-aligned pairs clone
            n = min(n, self.cap - off_dst)
            got = os.copy_file_range(self.sfd, self.fd, n, off_src, off_dst)
            assert got == n, f"copy_file_range copied {got} of {n}"
            if off_dst > size:
                self.data += bytes(off_dst - size)
            self.data[off_dst:off_dst + n] = self.src[off_src:off_src + n]
        elif op == "private":
            if size:
                with mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE) as pm:
                    off, n = self.span(size)
                    buf = self.rng.randbytes(n)
                    pm[off:off + n] = buf
                    expect = bytearray(self.data)
                    expect[off:off + n] = buf
                    assert pm[:] == expect, "a private mapping lost its own store"
                    assert os.pread(self.fd, size, 0) == self.data, "a private store reached the file"
        return op

    def check(self, where: str) -> None:
        size = len(self.data)
        assert os.fstat(self.fd).st_size == size, where
        assert os.pread(self.fd, self.cap + 1, 0) == self.data, f"read(2) differs after {where}"
        assert self.map[:size] == self.data, f"the shared mapping differs after {where}"


@pytest.mark.parametrize("seed", [1, 2])
def test_randomized_mapped_and_plain_io_match_a_model(workdir, seed):
    rng = random.Random(seed)
    m = Model(workdir / "f", workdir / "src", 17 * PAGE + 123, rng)
    done = []
    try:
        for i in range(2500):
            done.append(m.step())
            m.check(f"step {i} ({done[-1]}; last ops {done[-6:]})")
    finally:
        m.close()
    assert set(done) == {"pwrite", "map_write", "map_read", "truncate", "punch", "copy", "private"}


# -- SQLite in WAL mode ---------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sqlite3, sys
    db, first, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
    c = sqlite3.connect(db, isolation_level=None, timeout=60)
    c.execute("pragma synchronous=full")       # WAL: a commit is durable when it returns
    c.execute("pragma mmap_size=67108864")     # read the database through a shared mapping too
    c.execute("pragma wal_autocheckpoint=16")  # checkpoint often: pages move from the WAL to the file
    for i in range(first, first + count):
        c.execute("begin immediate")
        c.execute("insert into t values (?, randomblob(3000))", (i,))
        c.execute("commit")
        print("committed", i, flush=True)
    if hold:
        c.execute("begin immediate")
        for i in range(first + count, first + count + 50):
            c.execute("insert into t values (?, randomblob(3000))", (i,))
        print("inside", flush=True)
        sys.stdin.readline()                    # the daemon is killed while this transaction is open
""")


def make_db(path) -> None:
    r = subprocess.run(["sqlite3", str(path), "pragma journal_mode=wal; create table t(id integer primary key, b blob);"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "wal", r.stderr


def ids(path) -> list[int]:
    c = sqlite3.connect(path)
    try:
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
        assert c.execute("pragma journal_mode").fetchone() == ("wal",)
        return [r[0] for r in c.execute("select id from t order by id")]
    finally:
        c.close()


def test_sqlite_wal_two_connections_and_two_processes(workdir):
    db = workdir / "t.db"
    make_db(db)
    a, b = sqlite3.connect(db, isolation_level=None), sqlite3.connect(db, isolation_level=None)
    try:
        a.execute("insert into t values (1, x'00')")
        assert b.execute("select id from t").fetchall() == [(1,)]     # through the -shm mapping
        b.execute("begin")
        assert b.execute("select count(*) from t").fetchone() == (1,)
        a.execute("insert into t values (2, x'00')")                   # a snapshot stays a snapshot
        assert b.execute("select count(*) from t").fetchone() == (1,)
        b.execute("commit")
        assert b.execute("select count(*) from t").fetchone() == (2,)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "3", "300", "no"],
                                  stdout=subprocess.PIPE, text=True)
        seen = 2
        for line in writer.stdout:                                      # read while the other process writes
            n = b.execute("select count(*) from t").fetchone()[0]
            assert n >= seen, "a reader went back in time"
            seen = n
        assert writer.wait(60) == 0
        assert b.execute("select count(*) from t").fetchone() == (302,)
    finally:
        a.close()
        b.close()
    assert ids(db) == list(range(1, 303))
    r = subprocess.run(["sqlite3", str(db), "select count(*) from t;"], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "302", r.stderr


def test_sqlite_wal_loses_nothing_committed_when_the_daemon_dies_mid_transaction(mounts):
    store = mounts.store()
    m = mounts.mount(store, options=["--commit-interval", "3600"])   # only SQLite's fsyncs commit
    db = m.path("t.db")
    make_db(db)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "1", "120", "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    committed = []
    try:
        for line in writer.stdout:
            if line.startswith("inside"):
                break
            committed.append(int(line.split()[1]))
        assert len(committed) == 120
        os.kill(m.pid, signal.SIGKILL)                                # the transaction is open
        assert m.wait_daemon_exit(30)
    finally:
        writer.kill()
        writer.wait(30)
    assert fusermount(m.mnt) == 0
    wait_for(lambda: not is_mounted(m.mnt), 10, "the dead mount to go")
    assert_fsck_clean(store)
    m = mounts.mount(store, m.mnt)
    assert ids(m.path("t.db")) == committed                           # every commit, nothing of the open one
    m.unmount()


def test_msync_and_fsync_make_mapped_writes_durable(mounts):
    store = mounts.store()
    m = mounts.mount(store, options=["--commit-interval", "3600"])
    p = m.path("f")
    p.write_bytes(b"\0" * 4 * PAGE)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4 * PAGE) as mm:
            mm[PAGE:PAGE + 7] = b"durable"
            mm.flush()                                                # msync(MS_SYNC)
            os.fsync(fd)
            mm[0:4] = b"lost"                                         # neither written back nor synced
    except BaseException:
        os.close(fd)
        raise
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_daemon_exit(30)
    try:
        os.close(fd)
    except OSError:
        pass                                                          # ENOTCONN from a dead mount
    assert fusermount(m.mnt) == 0
    wait_for(lambda: not is_mounted(m.mnt), 10, "the dead mount to go")
    m = mounts.mount(store, m.mnt)
    got = m.path("f").read_bytes()
    assert got[PAGE:PAGE + 7] == b"durable"
    assert got[:4] in (b"\0" * 4, b"lost")
    m.unmount()
