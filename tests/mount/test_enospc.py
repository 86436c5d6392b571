"""A full store and the limits of names, offsets, depth and sparseness, on a real mount.

ENOSPC: a store made with `mkfs --size 8M`. The writer gets ENOSPC, nothing written before is harmed (a
write that fails changes nothing), a clone that needs no new block still works when the store is full,
and deleting files gives the space back. Limits: names over 255 bytes, offsets past the maximum file size
(the core's MAX_FILE_SIZE), 200 nested directories (deeper than PATH_MAX), a 1-byte write at 8 TiB.
Every mount is unmounted at the end and fsck'd (`mounts` / `fs` fixtures of conftest.py).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from mountutil import run_cli
from reflinkfs.core.volume import MAX_FILE_SIZE

BS = 4096
MIB = 1 << 20


def blocks(tag: int, n: int) -> bytes:
    """n distinctive 4 KiB blocks."""
    return b"".join((bytes([tag]) + i.to_bytes(4, "little")) * (BS // 5) + bytes(BS % 5) for i in range(n))


def write_all(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(path, chunk: int) -> int:
    """Append `chunk`-byte writes to path until the store is full; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    done = 0
    try:
        while True:
            try:
                n = os.write(fd, blocks(0xF0, chunk // BS)[:chunk])
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return done
            done += n
            if n < chunk:
                return done
    finally:
        os.close(fd)


def extents(path) -> dict:
    r = run_cli("stat", "--json", path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[str(path)]


# -- ENOSPC ----------------------------------------------------------------------------------------------
def test_full_store(mounts):
    store = mounts.store("--size", "8M")
    m = mounts.mount(store)
    mnt = m.mnt
    keep = blocks(0xA1, 256)                    # 1 MiB, block aligned
    odd = blocks(0xB2, 20)[:20 * BS - 777]       # not a whole number of blocks
    write_all(mnt / "keep", keep)
    write_all(mnt / "odd", odd)
    fsync_dir(mnt)
    st = os.statvfs(mnt)
    assert st.f_blocks == 8 * MIB // BS

    # fill it: big writes first, then block by block, until nothing fits
    filled = fill(mnt / "filler", 256 * 1024)
    filled += fill(mnt / "filler", BS)
    assert filled > 5 * MIB
    assert os.statvfs(mnt).f_bavail == 0
    with pytest.raises(OSError) as e:
        write_all(mnt / "one-more", b"x" * BS)
    assert e.value.errno == errno.ENOSPC

    # nothing already written is harmed; a write that cannot get blocks changes nothing
    assert (mnt / "keep").read_bytes() == keep
    assert (mnt / "odd").read_bytes() == odd
    assert os.path.getsize(mnt / "filler") == filled
    with open(mnt / "filler", "rb") as f:
        data = f.read()
    assert data == b"".join(blocks(0xF0, 64)[:256 * 1024] for _ in range(filled // (256 * 1024))) + \
        blocks(0xF0, 1) * ((filled % (256 * 1024)) // BS)
    fd = os.open(mnt / "keep", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:        # keep's blocks are committed: overwriting needs new ones
            os.pwrite(fd, b"y" * (8 * BS), 4 * BS)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (mnt / "keep").read_bytes() == keep

    # clones that need no new block work on a full store
    r = run_cli("clone", mnt / "keep", mnt / "keep.clone")
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["cp", "--reflink=auto", mnt / "keep", mnt / "keep.cp"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = run_cli("clone", mnt / "odd", mnt / "odd.clone")   # the partial last block is shared too
    assert r.returncode == 0, r.stderr
    for name, want in (("keep.clone", keep), ("keep.cp", keep), ("odd.clone", odd)):
        assert (mnt / name).read_bytes() == want, name
    assert extents(mnt / "keep.cp")["shared_bytes"] == len(keep)
    assert os.statvfs(mnt).f_bavail == 0
    # ... and one that must copy bytes (offsets not block aligned) fails cleanly
    sfd, dfd = os.open(mnt / "keep", os.O_RDONLY), os.open(mnt / "part", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            os.copy_file_range(sfd, dfd, 64 * BS, 100, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(sfd)
        os.close(dfd)
    assert os.path.getsize(mnt / "part") == 0

    # deleting gives the space back (statfs counts blocks released in the open transaction), and a new
    # write succeeds without an explicit commit (the core commits once and retries on ENOSPC)
    before = os.statvfs(mnt).f_bavail
    os.unlink(mnt / "filler")
    after = os.statvfs(mnt).f_bavail
    assert after - before >= filled // BS, (before, after, filled // BS)
    big = blocks(0xC3, (filled // BS) - 16)
    write_all(mnt / "new", big)
    assert (mnt / "new").read_bytes() == big
    os.unlink(mnt / "new")
    fsync_dir(mnt)
    assert os.statvfs(mnt).f_bavail >= filled // BS
    for name, want in (("keep", keep), ("odd", odd), ("keep.clone", keep), ("keep.cp", keep), ("odd.clone", odd)):
        assert (mnt / name).read_bytes() == want, name
    # the fixture unmounts, checks the daemon log and runs fsck --verify-data


# -- limits -------------------------------------------------------------------------------------------
def test_name_length(workdir):
    ok, long_ = "n" * 255, "n" * 256
    (workdir / ok).write_bytes(b"1")
    assert ok in os.listdir(workdir)
    wide_ok, wide_long = "é" * 127 + "a", "é" * 128          # 255 and 256 bytes of UTF-8
    (workdir / wide_ok).write_bytes(b"2")
    for what, fn in [("create", lambda n: os.open(workdir / n, os.O_CREAT | os.O_WRONLY, 0o644)),
                     ("mkdir", lambda n: os.mkdir(workdir / n)),
                     ("symlink", lambda n: os.symlink("x", workdir / n)),
                     ("link", lambda n: os.link(workdir / ok, workdir / n)),
                     ("rename", lambda n: os.rename(workdir / ok, workdir / n)),
                     ("stat", lambda n: os.stat(workdir / n))]:
        for name in (long_, wide_long):
            with pytest.raises(OSError) as e:
                fn(name)
            assert e.value.errno == errno.ENAMETOOLONG, (what, e.value)
    assert sorted(os.listdir(workdir)) == sorted([ok, wide_ok])
    assert (workdir / ok).read_bytes() == b"1"
    assert os.statvfs(workdir).f_namemax == 255


def test_maximum_file_size(workdir):
    p = workdir / "max"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"z", MAX_FILE_SIZE - 1) == 1          # the last byte there may be
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        for off, n in ((MAX_FILE_SIZE, 1), (MAX_FILE_SIZE - 1, 2), (MAX_FILE_SIZE + (1 << 40), 1)):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"z" * n, off)
            assert e.value.errno == errno.EFBIG, (off, n)
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, MAX_FILE_SIZE + 1)
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError) as e:
            os.posix_fallocate(fd, MAX_FILE_SIZE - BS, 2 * BS)
        assert e.value.errno == errno.EFBIG
        assert os.fstat(fd).st_size == MAX_FILE_SIZE
        assert os.pread(fd, 2, MAX_FILE_SIZE - 2) == b"\0z"
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)


def test_deep_tree(workdir):
    """200 nested directories whose full path (about 5 KiB) is longer than PATH_MAX: walked with dir fds."""
    depth, name = 200, "a-directory-name-25-bytes"
    fds = [os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        fd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1])
        os.write(fd, b"deep")
        os.close(fd)
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(workdir, *[name] * depth, "leaf"))
        assert e.value.errno == errno.ENAMETOOLONG          # the kernel's PATH_MAX, not ours
        rel = os.path.join(*[name] * 150)                   # within PATH_MAX a plain path works
        assert os.path.isdir(workdir / rel)
        assert os.stat(workdir / rel).st_nlink == 3
    finally:
        for fd in fds:
            os.close(fd)
    # walk down again from the top, one lookup per level, then remove it all bottom-up
    fds = [os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fds[-1])
        assert os.read(leaf, 10) == b"deep"
        os.close(leaf)
        os.unlink("leaf", dir_fd=fds[-1])
        for level in range(depth - 1, -1, -1):
            os.rmdir(name, dir_fd=fds[level])
    finally:
        for fd in fds:
            os.close(fd)
    assert os.listdir(workdir) == []


def test_huge_sparse_file(workdir):
    p = workdir / "sparse"
    at = 8 << 40                                             # 8 TiB
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"!", at) == 1
        st = os.fstat(fd)
        assert st.st_size == at + 1
        assert st.st_blocks * 512 <= BS                      # one block is stored, not 8 TiB
        assert os.pread(fd, 2 * BS, at - BS) == bytes(BS) + b"!"
        assert os.pread(fd, MIB, 0) == bytes(MIB)
        assert os.pread(fd, MIB, at // 2) == bytes(MIB)
        assert os.pread(fd, 10, at + 1) == b""
    finally:
        os.close(fd)
    du = subprocess.run(["du", "-k", p], capture_output=True, text=True)
    assert du.returncode == 0 and int(du.stdout.split()[0]) <= 4, du.stdout
    info = extents(p)
    assert info["size"] == at + 1 and info["count"] == 1
    assert info["extents"][0][0] == at // BS
    os.unlink(p)
