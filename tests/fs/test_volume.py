"""The core driven directly: namespace, file data, clones, lifetime, damage and crashes.

Every test ends with fsck (with data verification) clean, through the `vol`/`open_volume` fixtures.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

import reflinkfs
from reflinkfs.core import volume as volume_mod
from reflinkfs.core.datafile import GROW_STEP, locate, segment_path
from reflinkfs.core.volume import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE, Volume
from reflinkfs.errors import FsError
from reflinkfs.meta.schema import mkfs

BS = 4096
ROOT = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(reflinkfs.__file__)))


def rnd(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def mkfile(v: Volume, name: bytes, data: bytes = b"", parent: int = ROOT) -> int:
    ino = v.create(parent, name, 0o644, 1000, 1000).ino
    if data:
        assert v.write(ino, 0, data) == len(data)
    return ino


def content(v: Volume, ino: int) -> bytes:
    size = v.getattr(ino).size
    data = bytes(v.read(ino, 0, size + 10))
    assert len(data) == size
    return data


def err(code: int, fn, *args, **kwargs) -> FsError:
    with pytest.raises(FsError) as e:
        fn(*args, **kwargs)
    assert e.value.errno == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(e.value.errno)}"
    return e.value


def pblocks(v: Volume, ino: int) -> dict[int, int]:
    """lblock -> pblock of every mapped block of a file."""
    return {lb + i: pb + i for lb, pb, n, _ in v.extent_map(ino) for i in range(n)}


def names(v: Volume, ino: int) -> list[bytes]:
    return [name for _, name, _ in v.readdir(ino)]


# -- namespace -----------------------------------------------------------------------------------
def test_create_lookup_getattr(vol):
    a = vol.create(ROOT, b"f", 0o640, 12, 34)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o640
    assert (a.uid, a.gid, a.nlink, a.size, a.blocks) == (12, 34, 1, 0, 0)
    assert vol.lookup(ROOT, b"f").ino == a.ino
    assert vol.lookup(ROOT, b".").ino == ROOT
    assert vol.lookup(ROOT, b"..").ino == ROOT
    err(errno.ENOENT, vol.lookup, ROOT, b"g")
    err(errno.ENOENT, vol.getattr, 999)


def test_eexist(vol):
    mkfile(vol, b"f")
    err(errno.EEXIST, vol.create, ROOT, b"f", 0o644, 0, 0)
    err(errno.EEXIST, vol.mkdir, ROOT, b"f", 0o755, 0, 0)
    err(errno.EEXIST, vol.symlink, ROOT, b"f", b"x", 0, 0)


def test_names_too_long_or_invalid(vol):
    mkfile(vol, b"n" * 255)
    err(errno.ENAMETOOLONG, vol.create, ROOT, b"n" * 256, 0o644, 0, 0)
    err(errno.ENAMETOOLONG, vol.mkdir, ROOT, b"n" * 256, 0o755, 0, 0)
    err(errno.ENAMETOOLONG, vol.lookup, ROOT, b"n" * 256)
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    err(errno.ENAMETOOLONG, vol.rename, ROOT, b"d", ROOT, b"m" * 256)
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        err(errno.EINVAL, vol.create, ROOT, bad, 0o644, 0, 0)
    assert names(vol, ROOT) == [b"n" * 255, b"d"] and names(vol, d) == []


def test_enotdir(vol):
    f = mkfile(vol, b"f")
    err(errno.ENOTDIR, vol.create, f, b"x", 0o644, 0, 0)
    err(errno.ENOTDIR, vol.lookup, f, b"x")
    err(errno.ENOTDIR, vol.readdir, f)
    err(errno.ENOTDIR, vol.rmdir, ROOT, b"f")


def test_mkdir_rmdir_nlink_enotempty_eisdir(vol):
    assert vol.getattr(ROOT).nlink == 2
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert stat.S_ISDIR(d.mode) and d.nlink == 2
    assert vol.getattr(ROOT).nlink == 3
    sub = vol.mkdir(d.ino, b"sub", 0o755, 0, 0).ino
    assert vol.getattr(d.ino).nlink == 3
    assert vol.lookup(sub, b"..").ino == d.ino
    mkfile(vol, b"f", parent=sub)
    err(errno.ENOTEMPTY, vol.rmdir, d.ino, b"sub")
    err(errno.ENOTEMPTY, vol.rmdir, ROOT, b"d")
    err(errno.EISDIR, vol.unlink, ROOT, b"d")
    err(errno.ENOENT, vol.rmdir, ROOT, b"nope")
    err(errno.ENOENT, vol.unlink, ROOT, b"nope")
    vol.unlink(sub, b"f")
    vol.rmdir(d.ino, b"sub")
    assert vol.getattr(d.ino).nlink == 2
    err(errno.ENOENT, vol.getattr, sub)
    vol.rmdir(ROOT, b"d")
    assert vol.getattr(ROOT).nlink == 2 and names(vol, ROOT) == []


def test_create_in_removed_directory(vol):
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    vol.opened(d)
    vol.rmdir(ROOT, b"d")
    err(errno.ENOENT, vol.create, d, b"x", 0o644, 0, 0)
    vol.released(d)
    err(errno.ENOENT, vol.getattr, d)


def test_hard_links(vol):
    f = mkfile(vol, b"f", b"data")
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    assert vol.link(f, d, b"g").nlink == 2
    assert vol.lookup(d, b"g").ino == f
    err(errno.EEXIST, vol.link, f, ROOT, b"f")
    err(errno.EPERM, vol.link, d, ROOT, b"d2")
    vol.unlink(ROOT, b"f")
    assert vol.getattr(f).nlink == 1
    assert content(vol, f) == b"data"
    vol.unlink(d, b"g")
    err(errno.ENOENT, vol.getattr, f)


def test_symlink_readlink_mknod(vol):
    s = vol.symlink(ROOT, b"s", b"/some/where", 0, 0)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"/some/where")
    assert vol.readlink(s.ino) == b"/some/where"
    f = mkfile(vol, b"f")
    err(errno.EINVAL, vol.readlink, f)
    err(errno.ENAMETOOLONG, vol.symlink, ROOT, b"s2", b"x" * 4096, 0, 0)
    p = vol.mknod(ROOT, b"p", stat.S_IFIFO | 0o600, 0, 0)
    assert stat.S_ISFIFO(p.mode)
    err(errno.EINVAL, vol.write, p.ino, 0, b"x")
    err(errno.EINVAL, vol.mknod, ROOT, b"dd", stat.S_IFDIR | 0o755, 0, 0)


def test_rename_simple_and_over_file(vol):
    a = mkfile(vol, b"a", b"A" * 5000)
    b = mkfile(vol, b"b", b"B" * 9000)
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    vol.rename(ROOT, b"a", d, b"a2")
    assert names(vol, ROOT) == [b"b", b"d"] and vol.lookup(d, b"a2").ino == a
    vol.rename(d, b"a2", ROOT, b"b")          # replaces b: its inode and blocks go away
    assert vol.lookup(ROOT, b"b").ino == a and content(vol, a) == b"A" * 5000
    err(errno.ENOENT, vol.getattr, b)
    err(errno.ENOENT, vol.rename, ROOT, b"nope", ROOT, b"x")


def test_rename_same_inode_is_a_no_op(vol):
    a = mkfile(vol, b"a")
    vol.link(a, ROOT, b"b")
    vol.rename(ROOT, b"a", ROOT, b"b")
    assert names(vol, ROOT) == [b"a", b"b"] and vol.getattr(a).nlink == 2


def test_rename_directories(vol):
    d1 = vol.mkdir(ROOT, b"d1", 0o755, 0, 0).ino
    d2 = vol.mkdir(ROOT, b"d2", 0o755, 0, 0).ino
    sub = vol.mkdir(d1, b"sub", 0o755, 0, 0).ino
    mkfile(vol, b"f", parent=sub)
    mkfile(vol, b"file")
    err(errno.EISDIR, vol.rename, ROOT, b"file", ROOT, b"d2")
    err(errno.ENOTDIR, vol.rename, ROOT, b"d2", ROOT, b"file")
    err(errno.ENOTEMPTY, vol.rename, ROOT, b"d2", ROOT, b"d1")
    # a directory into its own subtree
    err(errno.EINVAL, vol.rename, ROOT, b"d1", sub, b"x")
    err(errno.EINVAL, vol.rename, ROOT, b"d1", d1, b"x")
    # move sub from d1 to d2: nlinks follow
    vol.rename(d1, b"sub", d2, b"sub")
    assert vol.getattr(d1).nlink == 2 and vol.getattr(d2).nlink == 3
    assert vol.lookup(sub, b"..").ino == d2
    # replace an empty directory
    vol.rename(ROOT, b"d2", ROOT, b"d1")
    err(errno.ENOENT, vol.getattr, d1)
    assert vol.lookup(ROOT, b"d1").ino == d2
    assert vol.getattr(ROOT).nlink == 3


def test_rename_noreplace(vol):
    mkfile(vol, b"a")
    mkfile(vol, b"b")
    err(errno.EEXIST, vol.rename, ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    vol.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    assert sorted(names(vol, ROOT)) == [b"b", b"c"]
    err(errno.EINVAL, vol.rename, ROOT, b"b", ROOT, b"c", RENAME_NOREPLACE | RENAME_EXCHANGE)


def test_rename_exchange(vol):
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    f = mkfile(vol, b"f", parent=d)
    e = vol.mkdir(ROOT, b"e", 0o755, 0, 0).ino
    sub = vol.mkdir(e, b"sub", 0o755, 0, 0).ino
    err(errno.ENOENT, vol.rename, ROOT, b"d", ROOT, b"nope", RENAME_EXCHANGE)
    # a file in d and a directory in e swap places: the parents' nlink follow the directory
    assert (vol.getattr(d).nlink, vol.getattr(e).nlink) == (2, 3)
    vol.rename(d, b"f", e, b"sub", RENAME_EXCHANGE)
    assert vol.lookup(d, b"f").ino == sub and vol.lookup(e, b"sub").ino == f
    assert (vol.getattr(d).nlink, vol.getattr(e).nlink) == (3, 2)
    assert vol.lookup(sub, b"..").ino == d
    # exchanging a directory with something inside it
    mkfile(vol, b"inner", parent=sub)
    err(errno.EINVAL, vol.rename, ROOT, b"d", sub, b"inner", RENAME_EXCHANGE)
    err(errno.EINVAL, vol.rename, sub, b"inner", ROOT, b"d", RENAME_EXCHANGE)


def test_xattrs(vol):
    f = mkfile(vol, b"f")
    err(errno.ENODATA, vol.getxattr, f, b"user.a")
    vol.setxattr(f, b"user.a", b"1")
    vol.setxattr(f, b"user.b", b"")
    assert vol.getxattr(f, b"user.a") == b"1" and vol.getxattr(f, b"user.b") == b""
    assert vol.listxattr(f) == [b"user.a", b"user.b"]
    err(errno.EEXIST, vol.setxattr, f, b"user.a", b"2", XATTR_CREATE)
    err(errno.ENODATA, vol.setxattr, f, b"user.c", b"2", XATTR_REPLACE)
    vol.setxattr(f, b"user.a", b"2", XATTR_REPLACE)
    vol.setxattr(f, b"user.c", b"3", XATTR_CREATE)
    assert vol.getxattr(f, b"user.a") == b"2" and vol.listxattr(f) == [b"user.a", b"user.b", b"user.c"]
    vol.removexattr(f, b"user.b")
    err(errno.ENODATA, vol.removexattr, f, b"user.b")
    assert vol.listxattr(f) == [b"user.a", b"user.c"]
    err(errno.E2BIG, vol.setxattr, f, b"user.big", b"x" * 65537)
    err(errno.ERANGE, vol.setxattr, f, b"", b"x")
    vol.setxattr(ROOT, b"user.root", b"r")
    assert vol.getxattr(ROOT, b"user.root") == b"r"
    vol.unlink(ROOT, b"f")
    assert vol.db.execute("SELECT COUNT(*) FROM xattrs WHERE ino=?", (f,)).fetchone()[0] == 0


def test_readdir_pages_stably(vol):
    for i in range(10):
        mkfile(vol, b"f%d" % i)
    page1 = vol.readdir(ROOT, 0, limit=4)
    assert [n for _, n, _ in page1] == [b"f0", b"f1", b"f2", b"f3"]
    vol.unlink(ROOT, b"f1")            # removing a seen entry must not shift the next page
    mkfile(vol, b"new")
    page2 = vol.readdir(ROOT, page1[-1][0], limit=4)
    assert [n for _, n, _ in page2] == [b"f4", b"f5", b"f6", b"f7"]
    rest = vol.readdir(ROOT, page2[-1][0])
    assert [n for _, n, _ in rest] == [b"f8", b"f9", b"new"]
    assert rest[0][2].ino == vol.lookup(ROOT, b"f8").ino


def test_setattr(vol):
    f = mkfile(vol, b"f")
    a = vol.setattr(f, mode=0o4711, uid=5, gid=6, atime_ns=11, mtime_ns=22)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o4711
    assert (a.uid, a.gid, a.atime_ns, a.mtime_ns) == (5, 6, 11, 22)
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    err(errno.EISDIR, vol.setattr, d, size=0)
    err(errno.EISDIR, vol.truncate, d, 0)
    err(errno.EINVAL, vol.truncate, f, -1)
    err(errno.EFBIG, vol.truncate, f, 1 << 47)


def test_setgid_directory_passes_group(vol):
    d = vol.mkdir(ROOT, b"d", 0o2775, 10, 20).ino
    assert vol.getattr(d).mode & stat.S_ISGID
    f = vol.create(d, b"f", 0o644, 1, 1)
    sub = vol.mkdir(d, b"sub", 0o755, 1, 1)
    assert f.gid == 20 and sub.gid == 20 and sub.mode & stat.S_ISGID


# -- file data -----------------------------------------------------------------------------------
def test_write_read_roundtrip_unaligned(vol):
    f = mkfile(vol, b"f")
    model = bytearray()
    rng = random.Random(1)
    for i in range(40):
        off = rng.randrange(0, 6 * BS)
        data = rnd(rng.randrange(1, 3 * BS), i)
        vol.write(f, off, data)
        if off > len(model):
            model += bytes(off - len(model))
        model[off:off + len(data)] = data
        assert content(vol, f) == model
        lo = rng.randrange(0, len(model))
        assert bytes(vol.read(f, lo, 777)) == model[lo:lo + 777]
    assert vol.getattr(f).blocks == len(pblocks(vol, f))
    assert bytes(vol.read(f, len(model), 10)) == b""
    assert bytes(vol.read(f, len(model) + 5000, 10)) == b""


def test_holes_read_as_zeros(vol):
    f = mkfile(vol, b"f")
    vol.write(f, 3 * BS + 10, b"xyz")
    assert vol.getattr(f).size == 3 * BS + 13
    assert content(vol, f) == bytes(3 * BS + 10) + b"xyz"
    assert sorted(pblocks(vol, f)) == [3]
    assert vol.getattr(f).blocks == 1


def test_sparse_file_at_8_tib(vol):
    f = mkfile(vol, b"f")
    off = 8 << 40
    vol.write(f, off, b"hello")
    a = vol.getattr(f)
    assert a.size == off + 5 and a.blocks == 1
    assert bytes(vol.read(f, off - 10, 100)) == bytes(10) + b"hello"
    assert bytes(vol.read(f, 1 << 40, 64)) == bytes(64)
    assert bytes(vol.read(f, 0, 64)) == bytes(64)
    [(lb, _, n, rc)] = vol.extent_map(f)
    assert (lb, n, rc) == (off // BS, 1, 1)
    assert vol.usage()["physical_bytes"] == BS
    # the data file is reserved ahead in GROW_STEP chunks, never by the logical size
    assert vol.data.size_blocks() <= GROW_STEP // BS, "a sparse file must not grow the data file"
    err(errno.EFBIG, vol.write, f, (1 << 46) - 2, b"abc")
    err(errno.EINVAL, vol.write, f, -1, b"abc")


def test_truncate_shrink_then_grow_shows_zeros(vol):
    data = rnd(5 * BS + 123)
    f = mkfile(vol, b"f", data)
    vol.commit()
    for new, expect in [(3 * BS + 7, data[:3 * BS + 7]),
                        (6 * BS, data[:3 * BS + 7] + bytes(6 * BS - 3 * BS - 7)),
                        (2 * BS, data[:2 * BS]),
                        (4 * BS + 1, data[:2 * BS] + bytes(2 * BS + 1)),
                        (0, b""),
                        (BS + 5, bytes(BS + 5))]:
        vol.truncate(f, new)
        assert vol.getattr(f).size == new
        assert content(vol, f) == expect, f"after truncate to {new}"
    assert pblocks(vol, f) == {}


def test_shrink_then_write_past_eof_shows_zeros(vol):
    data = rnd(3 * BS)
    f = mkfile(vol, b"f", data)
    vol.truncate(f, 100)
    vol.write(f, 2 * BS + 50, b"z")
    assert content(vol, f) == data[:100] + bytes(2 * BS + 50 - 100) + b"z"


def test_truncate_frees_blocks(vol):
    f = mkfile(vol, b"f", rnd(8 * BS))
    vol.commit()
    vol.truncate(f, BS)
    vol.commit()
    assert vol.usage()["physical_bytes"] == BS
    seg = vol.wholeness(f).segment
    assert vol.data.segment_layout(seg) == (BS, [(0, 1)]), "the freed blocks are punched out of its segment"


def test_truncate_frees_blocks_of_segment_0(vol):
    vol.small_file_bytes = 1 << 62          # packed into segment 0, whose freed blocks become free runs
    f = mkfile(vol, b"f", rnd(8 * BS))
    vol.commit()
    vol.truncate(f, BS)
    vol.commit()
    assert vol.usage()["physical_bytes"] == BS
    assert vol.space.free_blocks() == 7


def test_punch_hole(vol):
    data = rnd(5 * BS)
    f = mkfile(vol, b"f", data)
    vol.commit()           # committed blocks: the partial ones are copied on write, the others stay put
    before = pblocks(vol, f)
    vol.punch_hole(f, BS + 100, 2 * BS - 50)        # [BS+100, 3BS+50)
    expect = bytearray(data)
    expect[BS + 100:3 * BS + 50] = bytes(2 * BS - 50)
    assert content(vol, f) == expect and vol.getattr(f).size == 5 * BS
    after = pblocks(vol, f)
    assert 2 not in after, "a whole block inside the hole must be deallocated"
    assert after[0] == before[0] and after[4] == before[4]
    vol.punch_hole(f, 4 * BS, 100 * BS)             # past EOF: size unchanged
    assert vol.getattr(f).size == 5 * BS and 4 not in pblocks(vol, f)
    vol.punch_hole(f, 10, 20)                       # inside one block
    expect[4 * BS:] = bytes(BS)
    expect[10:30] = bytes(20)
    assert content(vol, f) == expect
    err(errno.EINVAL, vol.punch_hole, f, 0, 0)


def test_zero_range(vol):
    data = rnd(3 * BS)
    f = mkfile(vol, b"f", data)
    vol.zero_range(f, BS - 10, 20)
    expect = bytearray(data)
    expect[BS - 10:BS + 10] = bytes(20)
    assert content(vol, f) == expect
    vol.zero_range(f, 2 * BS, 3 * BS)               # extends the size
    expect[2 * BS:] = bytes(3 * BS)
    assert content(vol, f) == expect
    vol.zero_range(f, 5 * BS, 3 * BS, keep_size=True)
    assert vol.getattr(f).size == 5 * BS


def test_allocate(vol):
    f = mkfile(vol, b"f", b"abc")
    vol.allocate(f, BS, 2 * BS)
    assert vol.getattr(f).size == 3 * BS
    assert sorted(pblocks(vol, f)) == [0, 1, 2]
    assert content(vol, f) == b"abc" + bytes(3 * BS - 3)
    vol.allocate(f, 0, 10)                          # already allocated: nothing changes
    assert content(vol, f) == b"abc" + bytes(3 * BS - 3)


def test_allocate_keep_size_past_eof(vol, check_clean):
    f = mkfile(vol, b"f", b"x" * 100)
    vol.allocate(f, 0, 5 * BS, keep_size=True)
    assert vol.getattr(f).size == 100
    assert sorted(pblocks(vol, f)) == [0, 1, 2, 3, 4]
    check_clean(vol)
    vol.truncate(f, 4 * BS + 7)                     # growing over the reserved blocks shows zeros
    assert content(vol, f) == b"x" * 100 + bytes(4 * BS + 7 - 100)
    vol.truncate(f, 50)
    assert sorted(pblocks(vol, f)) == [0]


def test_write_to_directory_and_read_of_directory(vol):
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    err(errno.EISDIR, vol.write, d, 0, b"x")
    err(errno.EISDIR, vol.read, d, 0, 1)


def test_overwrite_in_place_only_within_the_open_transaction(vol):
    f = mkfile(vol, b"f", rnd(2 * BS, 1))
    p0 = pblocks(vol, f)
    vol.write(f, 0, rnd(2 * BS, 2))
    assert pblocks(vol, f) == p0, "a block allocated in this transaction is overwritten in place"
    vol.commit()
    vol.write(f, 10, b"new")
    p1 = pblocks(vol, f)
    assert p1[0] != p0[0], "a committed block was overwritten in place"
    assert p1[1] == p0[1]
    vol.commit()
    # the block released by the copy-on-write is punched out of its segment after the commit
    vol.wholeness(f)                              # (waits for the queued punches)
    assert vol.data.segment_layout(locate(p0[0])[0])[1] == [(1, 2)]


def test_enospc_is_atomic_and_retried_after_commit(tmp_path, open_volume):
    store = str(tmp_path / "small")
    mkfs(store, size_limit=16 * BS)
    v = open_volume(store)
    a = mkfile(v, b"a", rnd(10 * BS, 1))
    b = mkfile(v, b"b")
    v.clone_range(a, 0, b, 0, 10 * BS)
    v.commit()
    # rewriting b needs 10 new blocks; only 6 are left
    err(errno.ENOSPC, v.write, b, 0, rnd(10 * BS, 2))
    assert content(v, a) == rnd(10 * BS, 1) and content(v, b) == rnd(10 * BS, 1)
    assert [rc for *_, rc in v.extent_map(b)] == [2]
    # deleting a releases blocks only at commit; the write commits and retries by itself
    v.unlink(ROOT, b"a")
    v.truncate(b, 0)
    v.write(b, 0, rnd(16 * BS, 3))
    assert content(v, b) == rnd(16 * BS, 3)
    st = v.statfs()
    assert st["blocks"] == 16 and st["blocks_free"] == 0
    err(errno.ENOSPC, v.write, b, 16 * BS, b"x")


def _full_store_with_fresh_block(tmp_path, open_volume):
    """A 16-block store, full: f = [A (written in the open transaction), B (committed)], a committed
    3-block file src, and g filling the rest. Nothing is pending, so a retry after a commit cannot help."""
    store = str(tmp_path / "full")
    mkfs(store, size_limit=16 * BS)
    v = open_volume(store)
    f = mkfile(v, b"f")
    v.write(f, BS, b"B" * BS)
    src = mkfile(v, b"src", rnd(3 * BS))
    v.commit()
    v.write(f, 0, b"A" * BS)               # a fresh block: no committed state refers to it
    mkfile(v, b"g", b"G" * 11 * BS)
    assert v.statfs()["blocks_free"] == 0
    return v, f, src


@pytest.mark.parametrize("op", ["punch_hole", "zero_range"])
def test_failed_partial_zeroing_leaves_the_fresh_block_intact(tmp_path, open_volume, op):
    # zeroing [100, BS+100) touches A first, then needs a new block for the committed B and finds none:
    # the rollback must leave A's bytes matching A's checksum
    v, f, _ = _full_store_with_fresh_block(tmp_path, open_volume)
    err(errno.ENOSPC, getattr(v, op), f, 100, BS)
    assert content(v, f) == b"A" * BS + b"B" * BS


def test_failed_clone_leaves_the_fresh_block_intact(tmp_path, open_volume):
    v, f, src = _full_store_with_fresh_block(tmp_path, open_volume)
    err(errno.ENOSPC, v.clone_range, src, 100, f, 100, BS)   # head into A, then the tail needs a block
    assert content(v, f) == b"A" * BS + b"B" * BS


# -- clones --------------------------------------------------------------------------------------
def _mutate(v: Volume, ino: int, model: bytearray, op: str) -> None:
    """Apply one change to a file and to its model."""
    size = len(model)

    def write(off, data):
        v.write(ino, off, data)
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off:off + len(data)] = data

    if op == "edge":                       # straddles a block boundary
        write(BS - 2, b"EDGE")
    elif op == "partial":                  # inside one block
        write(BS + 100, b"partial")
    elif op == "append":
        write(size, rnd(BS + 1, 9))
    elif op == "shrink_grow":
        v.truncate(ino, BS + 10)
        del model[BS + 10:]
        v.truncate(ino, 5 * BS)
        model.extend(bytes(5 * BS - len(model)))
    elif op == "grow":
        v.truncate(ino, size + 2 * BS)
        model.extend(bytes(2 * BS))
    elif op == "punch":
        v.punch_hole(ino, 100, 2 * BS)
        model[100:2 * BS + 100] = bytes(2 * BS)
    elif op == "overwrite":
        write(0, rnd(size, 8))
    elif op == "zero":
        v.zero_range(ino, BS - 1, 2)
        model[BS - 1:BS + 1] = bytes(2)
    else:
        raise AssertionError(op)


CLONE_OPS = ["edge", "partial", "append", "shrink_grow", "grow", "punch", "overwrite", "zero"]


@pytest.mark.parametrize("side", ["original", "clone"])
@pytest.mark.parametrize("op", CLONE_OPS)
@pytest.mark.parametrize("size", [3 * BS, 3 * BS + 1000])
def test_clone_copies_are_independent(vol, op, side, size):
    data = rnd(size, 1)
    a = mkfile(vol, b"a", data)
    b = mkfile(vol, b"b")
    vol.commit()
    w0 = vol.data.stats().bytes_written
    assert vol.clone_range(a, 0, b, 0, size) == size
    assert vol.data.stats().bytes_written == w0, "a whole-file clone must not copy data"
    assert pblocks(vol, a) == pblocks(vol, b)
    assert {rc for *_, rc in vol.extent_map(b)} == {2}
    ma, mb = bytearray(data), bytearray(data)
    target, model = (a, ma) if side == "original" else (b, mb)
    _mutate(vol, target, model, op)
    assert content(vol, a) == ma
    assert content(vol, b) == mb
    if side == "original":
        assert mb == data
    else:
        assert ma == data
    vol.commit()
    assert content(vol, a) == ma and content(vol, b) == mb


def test_partial_last_block_is_shared_and_past_eof_stays_zero(vol):
    data = rnd(2 * BS + 500)
    a = mkfile(vol, b"a", data)
    b = mkfile(vol, b"b")
    vol.commit()
    r0, w0 = vol.data.stats().bytes_read, vol.data.stats().bytes_written
    vol.clone_range(a, 0, b, 0, len(data))
    assert (vol.data.stats().bytes_read, vol.data.stats().bytes_written) == (r0, w0)
    assert pblocks(vol, b) == pblocks(vol, a) and len(pblocks(vol, b)) == 3
    # appending to a (into the shared partial block) must not show through b past b's EOF
    vol.write(a, len(data), b"tail")
    vol.truncate(b, 3 * BS)
    assert content(vol, b) == data + bytes(3 * BS - len(data))
    assert content(vol, a) == data + b"tail"


def test_partial_last_block_is_copied_when_destination_is_longer(vol):
    src = rnd(BS + 500, 1)
    dst = rnd(3 * BS, 2)
    a = mkfile(vol, b"a", src)
    b = mkfile(vol, b"b", dst)
    vol.clone_range(a, 0, b, 0, len(src))
    assert content(vol, b) == src + dst[len(src):]
    assert pblocks(vol, b)[0] == pblocks(vol, a)[0]
    assert pblocks(vol, b)[1] != pblocks(vol, a)[1]


def test_clone_unaligned_head_and_tail(vol):
    data = rnd(6 * BS, 3)
    a = mkfile(vol, b"a", data)
    b = mkfile(vol, b"b", rnd(8 * BS, 4))
    expect = bytearray(rnd(8 * BS, 4))
    n = vol.clone_range(a, 100, b, BS + 100, 4 * BS)
    assert n == 4 * BS
    expect[BS + 100:5 * BS + 100] = data[100:4 * BS + 100]
    assert content(vol, b) == expect
    pa, pb = pblocks(vol, a), pblocks(vol, b)
    assert [pb[i] for i in (2, 3, 4)] == [pa[i] for i in (1, 2, 3)], "the aligned middle must be shared"
    assert pb[1] not in pa.values() and pb[5] not in pa.values()


def test_clone_misaligned_copies(vol):
    data = rnd(3 * BS, 5)
    a = mkfile(vol, b"a", data)
    b = mkfile(vol, b"b")
    assert vol.clone_range(a, 10, b, 7, 2 * BS) == 2 * BS
    assert content(vol, b) == bytes(7) + data[10:2 * BS + 10]
    assert not set(pblocks(vol, b).values()) & set(pblocks(vol, a).values())


def test_clone_clips_to_source_size_and_extends_destination(vol):
    a = mkfile(vol, b"a", rnd(BS + 10))
    b = mkfile(vol, b"b", b"short")
    assert vol.clone_range(a, BS, b, 3 * BS, 100 * BS) == 10
    assert content(vol, b) == b"short" + bytes(3 * BS - 5) + rnd(BS + 10)[BS:]
    assert vol.clone_range(a, BS + 10, b, 0, 5) == 0
    assert vol.clone_range(a, 50 * BS, b, 0, 5) == 0
    err(errno.EINVAL, vol.clone_range, a, -1, b, 0, 5)
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    err(errno.EISDIR, vol.clone_range, a, 0, d, 0, 5)


def test_clone_of_clone(vol):
    data = rnd(4 * BS)
    a = mkfile(vol, b"a", data)
    b, c = mkfile(vol, b"b"), mkfile(vol, b"c")
    vol.clone_range(a, 0, b, 0, len(data))
    vol.clone_range(b, 0, c, 0, len(data))
    assert {rc for *_, rc in vol.extent_map(a)} == {3}
    vol.write(b, BS, b"b was here")
    vol.write(c, 3 * BS - 1, b"and c")
    eb, ec = bytearray(data), bytearray(data)
    eb[BS:BS + 10] = b"b was here"
    ec[3 * BS - 1:3 * BS + 4] = b"and c"
    assert (content(vol, a), content(vol, b), content(vol, c)) == (data, eb, ec)
    rcs = {lb: rc for lb, _, n, rc in vol.extent_map(a) for lb in range(lb, lb + n)}
    assert rcs == {0: 3, 1: 2, 2: 2, 3: 2}


def test_clone_within_one_file(vol):
    data = rnd(4 * BS + 300)
    f = mkfile(vol, b"f", data)
    assert vol.clone_range(f, 0, f, 6 * BS, 2 * BS) == 2 * BS
    p = pblocks(vol, f)
    assert p[6] == p[0] and p[7] == p[1]
    vol.write(f, 10, b"first copy")
    vol.write(f, 7 * BS + 5, b"second copy")
    expect = bytearray(data) + bytes(2 * BS - 300) + bytearray(data[:2 * BS])
    expect[10:20] = b"first copy"
    expect[7 * BS + 5:7 * BS + 16] = b"second copy"
    assert content(vol, f) == expect
    # unaligned, still not overlapping
    vol.clone_range(f, 100, f, 4 * BS + 300, BS)
    expect[4 * BS + 300:5 * BS + 300] = expect[100:BS + 100]
    assert content(vol, f) == expect
    err(errno.EINVAL, vol.clone_range, f, 0, f, BS, 2 * BS)
    err(errno.EINVAL, vol.clone_range, f, BS, f, 0, 2 * BS)
    err(errno.EINVAL, vol.clone_range, f, 0, f, 0, 10)
    assert content(vol, f) == expect


def test_delete_original_keeps_clone(vol):
    data = rnd(5 * BS)
    a = mkfile(vol, b"a", data)
    b = mkfile(vol, b"b")
    vol.clone_range(a, 0, b, 0, len(data))
    vol.commit()
    assert vol.usage()["saved_bytes"] == len(data)
    vol.unlink(ROOT, b"a")
    vol.commit()
    assert content(vol, b) == data
    assert {rc for *_, rc in vol.extent_map(b)} == {1}
    assert vol.usage()["physical_bytes"] == len(data)
    assert vol.usage()["logical_bytes"] == len(data)


# -- lifetime -------------------------------------------------------------------------------------
def test_unlinked_open_file_lives_until_released(vol, check_clean):
    data = rnd(3 * BS)
    f = mkfile(vol, b"f", data)
    vol.commit()
    vol.opened(f)
    vol.opened(f)
    vol.unlink(ROOT, b"f")
    err(errno.ENOENT, vol.lookup, ROOT, b"f")
    assert vol.getattr(f).nlink == 0
    vol.write(f, 3 * BS, b"more")
    assert content(vol, f) == data + b"more"
    vol.commit()
    assert vol.usage()["physical_bytes"] == 4 * BS
    vol.released(f)
    assert content(vol, f) == data + b"more"
    vol.released(f)
    err(errno.ENOENT, vol.getattr, f)
    vol.commit()
    assert vol.usage()["physical_bytes"] == 0
    check_clean(vol)


def test_unlinked_open_file_is_gone_after_close_and_reopen(store, open_volume):
    v = open_volume()
    f = mkfile(v, b"f", rnd(2 * BS))
    v.opened(f)
    v.unlink(ROOT, b"f")
    v.close()                                  # the daemon stops without a release
    v = open_volume()
    err(errno.ENOENT, v.getattr, f)
    assert v.usage()["physical_bytes"] == 0


def test_reopen_persists_everything(store, open_volume):
    v = open_volume()
    d = v.mkdir(ROOT, b"d", 0o750, 7, 8).ino
    a = mkfile(v, b"a", rnd(3 * BS + 17), parent=d)
    b = mkfile(v, b"b")
    v.clone_range(a, 0, b, 0, 3 * BS + 17)
    v.write(b, 5, b"changed")
    v.link(a, ROOT, b"hard")
    s = v.symlink(ROOT, b"s", b"d/a", 0, 0).ino
    v.setxattr(a, b"user.k", b"v")
    v.write(a, 1 << 24, b"far")
    v.truncate(a, (1 << 24) + 2)
    attrs = {i: v.getattr(i) for i in (ROOT, d, a, b, s)}
    maps = {i: v.extent_map(i) for i in (a, b)}
    datas = {i: content(v, i) for i in (a, b)}
    v.close()
    v = open_volume()
    assert {i: v.getattr(i) for i in (ROOT, d, a, b, s)} == attrs
    assert {i: v.extent_map(i) for i in (a, b)} == maps
    assert {i: content(v, i) for i in (a, b)} == datas
    assert v.lookup(ROOT, b"hard").ino == a and v.getattr(a).nlink == 2
    assert v.readlink(s) == b"d/a" and v.getxattr(a, b"user.k") == b"v"
    assert names(v, ROOT) == [b"d", b"b", b"hard", b"s"]


# -- damage ---------------------------------------------------------------------------------------
@pytest.mark.damages_store
def test_checksum_mismatch_is_eio_naming_inode_and_offset(vol):
    data = rnd(4 * BS)
    f = mkfile(vol, b"f", data)
    vol.commit()
    seg, pos = locate(pblocks(vol, f)[2])
    fd = os.open(segment_path(vol.data.path, seg), os.O_RDWR)
    try:
        old = os.pread(fd, 3, pos + 100)
        os.pwrite(fd, bytes(x ^ 0xFF for x in old), pos + 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    e = err(errno.EIO, vol.read, f, 0, 4 * BS)
    assert f"inode {f}" in e.message and f"byte offset {2 * BS}" in e.message
    err(errno.EIO, vol.read, f, 2 * BS + 4000, 10)
    # the undamaged blocks still read
    assert bytes(vol.read(f, 0, 2 * BS)) == data[:2 * BS]
    assert bytes(vol.read(f, 3 * BS, BS)) == data[3 * BS:]
    # a partial write into the damaged block must not silently use the bad bytes either
    err(errno.EIO, vol.write, f, 2 * BS + 1, b"x")
    # overwriting the whole damaged block makes the file readable again
    vol.write(f, 2 * BS, data[2 * BS:3 * BS])
    assert content(vol, f) == data
    vol.commit()
    from reflinkfs.check import fsck_db
    assert fsck_db(vol.db, vol.data.path, verify_data=True).findings == []


# -- crashes --------------------------------------------------------------------------------------
CRASH_CHILD = textwrap.dedent("""
    import os, random, sys, time
    from reflinkfs.core.volume import Volume
    def rnd(n, seed): return random.Random(seed).randbytes(n)
    v = Volume.open(sys.argv[1])
    a = v.create(1, b"a", 0o644, 0, 0).ino
    v.write(a, 0, rnd(6 * 4096 + 5, 1))
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_range(a, 0, b, 0, 6 * 4096 + 5)
    c = v.create(1, b"c", 0o644, 0, 0).ino
    v.write(c, 0, rnd(3 * 4096, 2))
    o = v.create(1, b"o", 0o644, 0, 0).ino
    v.write(o, 0, rnd(5 * 4096, 6))
    v.opened(o)
    v.unlink(1, b"o")          # unlinked while open, and the daemon dies before the release
    v.commit()
    # not committed: overwrite committed (shared and unshared) blocks, release blocks, allocate new ones
    v.write(a, 0, rnd(6 * 4096, 3))
    v.write(b, 4096 + 7, rnd(3 * 4096, 4))
    v.unlink(1, b"c")
    v.truncate(a, 10)
    d = v.create(1, b"d", 0o644, 0, 0).ino
    v.write(d, 0, rnd(12 * 4096, 5))
    v.clone_range(d, 0, b, 0, 4096)
    v.setxattr(1, b"user.x", b"y")
    v.data.sync()     # the new bytes reach the data file; the metadata never commits
    print("ready", flush=True)
    time.sleep(60)
""")


def test_crash_shows_exactly_the_last_commit(store, open_volume):
    child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, store], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
    try:
        line = child.stdout.readline()
        assert line == b"ready\n", child.stderr.read().decode()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    from reflinkfs.check import fsck
    report = fsck(store, verify_data=True)
    assert report.damage == []
    # what the crash left and the next mount finishes: the orphan, and the segment files, blocks and
    # sizes of the writes that never committed
    orphan = [f for f in report.leftovers if f.startswith("orphan: ")]
    assert len(orphan) == 1 and "unlinked while open" in orphan[0]
    v = open_volume()                        # frees the orphan
    assert v.usage()["physical_bytes"] == (6 + 1 + 3) * BS
    assert names(v, ROOT) == [b"a", b"b", b"c"]
    a, b, c = (v.lookup(ROOT, n).ino for n in (b"a", b"b", b"c"))
    assert content(v, a) == rnd(6 * BS + 5, 1)
    assert content(v, b) == rnd(6 * BS + 5, 1)
    assert content(v, c) == rnd(3 * BS, 2)
    assert pblocks(v, a) == pblocks(v, b)
    assert v.listxattr(ROOT) == []
    # the store keeps working after the crash
    d = mkfile(v, b"d", rnd(12 * BS, 5))
    assert content(v, d) == rnd(12 * BS, 5)


@pytest.mark.parametrize("packed", [False, True])
def test_blocks_a_commit_frees_are_rewritten_on_disk_only_after_that_commit_is_durable(vol, packed):
    """commit(wait=False) leaves the WAL's fdatasync to a barrier; blocks the commit freed may be handed
    out again at once (a file's own places in its segment; free runs in segment 0), but their new bytes
    must stay queued behind the barrier, and so must the punch of the freed blocks."""
    if packed:
        vol.small_file_bytes = 1 << 62
    a = mkfile(vol, b"a", rnd(8 * BS, 1))
    vol.commit()
    [(_, pb, _, _)] = vol.extent_map(a)
    vol.truncate(a, 0)
    held, release = threading.Event(), threading.Event()
    real = vol.sync_meta

    def held_sync_meta():
        held.set()
        release.wait(timeout=10)
        real()
    vol.sync_meta = held_sync_meta
    barrier = vol.commit(wait=False)
    assert held.wait(timeout=10)
    b = a
    vol.write(b, 0, rnd(8 * BS, 2))
    assert [e[1] for e in vol.extent_map(b)] == [pb], "the freed blocks are handed out again"
    assert content(vol, b) == rnd(8 * BS, 2)
    assert on_disk(vol, pb, 8) == rnd(8 * BS, 1), "overwritten before the commit that freed them is durable"
    release.set()
    vol.data.wait_for(barrier)
    vol.sync_meta = real
    vol.commit()
    assert on_disk(vol, pb, 8) == rnd(8 * BS, 2)


def test_commits_copy_the_wal_into_the_database(vol, store, tmp_path, monkeypatch):
    monkeypatch.setattr(volume_mod, "CHECKPOINT_BYTES", 0)
    mkfile(vol, b"checkpointed", b"x")
    vol.commit()
    alone = tmp_path / "db-alone"
    shutil.copy(os.path.join(store, "meta.db"), alone)       # without its WAL
    db = sqlite3.connect(alone)
    assert (b"checkpointed",) in db.execute("SELECT name FROM dirents").fetchall()
    db.close()


def on_disk(v: Volume, pblock: int, nblocks: int) -> bytes:
    seg, pos = locate(pblock)
    with open(segment_path(v.data.path, seg), "rb") as f:
        f.seek(pos)
        return f.read(nblocks * BS)


def test_a_callers_buffer_may_change_once_write_returns(vol):
    buf = bytearray(rnd(3 * BS, 4))
    ino = mkfile(vol, b"f")
    vol.write(ino, 0, buf)
    buf[:] = bytes(len(buf))                  # the data file's queue must not see this
    vol.commit()
    assert content(vol, ino) == rnd(3 * BS, 4)


# -- statfs inode figures ------------------------------------------------------------------------
def _rows(v: Volume) -> int:
    return v.db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]


def test_statfs_counts_inodes_without_counting_rows(vol, monkeypatch):
    """files_used is kept in step with the inodes table (orphans included), survives a reopen, and is
    restored when an operation that had already inserted or deleted an inode row is rolled back."""
    v = vol
    d = v.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    f = mkfile(v, b"f", rnd(3 * BS))
    v.symlink(d, b"s", b"target", 0, 0)
    st = v.statfs()
    assert st["files_used"] == _rows(v) == 4
    assert st["files"] == st["files_used"] + st["files_free"]
    v.opened(f)
    v.unlink(ROOT, b"f")                         # unlinked while open: still an inode
    assert v.statfs()["files_used"] == _rows(v) == 4
    v.released(f)
    assert v.statfs()["files_used"] == _rows(v) == 3

    def fail(*a, **k):
        raise FsError(errno.EIO, "injected")
    monkeypatch.setattr(v, "_touch", fail)       # create calls it after inserting the row
    err(errno.EIO, v.create, ROOT, b"g", 0o644, 0, 0)
    monkeypatch.undo()
    assert v.statfs()["files_used"] == _rows(v) == 3
    free_inode = v._free_inode

    def free_then_fail(ino):
        free_inode(ino)
        fail()
    monkeypatch.setattr(v, "_free_inode", free_then_fail)
    err(errno.EIO, v.unlink, d, b"s")
    monkeypatch.undo()
    assert v.statfs()["files_used"] == _rows(v) == 3
    v.close()
    v2 = Volume.open(v.store)
    try:
        assert v2.statfs()["files_used"] == _rows(v2) == 3
    finally:
        v2.close()


def test_statfs_free_inodes_follow_free_space(tmp_path, open_volume):
    store = str(tmp_path / "small")
    mkfs(store, size_limit=64 * BS)
    v = open_volume(store)
    st = v.statfs()
    assert st["files_free"] == st["blocks_avail"] == 64 and st["files"] == 65
    mkfile(v, b"a", rnd(10 * BS))
    st = v.statfs()
    assert st["files_free"] == 54 and st["files_used"] == 2 and st["files"] == 56
