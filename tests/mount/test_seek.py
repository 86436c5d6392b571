"""SEEK_DATA and SEEK_HOLE on a real mount, and what cp makes of them.

The subject is a 10 GiB file with two 4 KiB blocks written (at 1 GiB and at 7 GiB). lseek(2) must
answer from the daemon's extent maps: the kernel sends FUSE_LSEEK, and if the daemon answered ENOSYS it
would answer itself, saying the whole file is data. cp then reads (and writes) 10 GB of zeros.

Nothing here is timed. That a copy moved only the data is shown by the daemon's own counter of bytes
served by its read path (`cache.bytes_served` in the status attribute on the mount root; holes count,
as zeros), and by the destination's allocated blocks and data map.

What coreutils 9.1 does with such a file, in all three directions (out of the mount, into it, inside
it; seen with strace): FICLONE (which fails), then lseek(SEEK_DATA) / lseek(SEEK_HOLE) per data
region, one read and one write of each region, an lseek past each hole in the destination, and an
ftruncate to the size at the end. It never calls copy_file_range for a file that looks sparse, so a
copy inside the mount writes new blocks for the data instead of sharing them (`--sparse=never` or
`reflinkfs clone` share).
"""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from _sharing import BS, block_map, counters, delta

GiB = 1 << 30
SIZE = 10 * GiB
DATA_AT = (1 * GiB, 7 * GiB)            # the written blocks; neither at 0 nor at the end
FAR_BELOW = 1 << 20                     # "far below the file size": a thousandth of a percent of it


def block(i: int) -> bytes:
    return bytes([0x41 + i]) * 100 + os.urandom(BS - 100)


def make_sparse(path) -> list[bytes]:
    """The subject file at path: SIZE bytes, data only in the blocks at DATA_AT. Returns their bytes."""
    blocks = [block(i) for i in range(len(DATA_AT))]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, data in zip(DATA_AT, blocks):
            assert os.pwrite(fd, data, off) == BS
        os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)
    return blocks


def data_map(path) -> list[tuple[int, int]]:
    """[start, end) of each data region, walked with SEEK_DATA / SEEK_HOLE (what cp does)."""
    regions = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                return regions
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, pos))
    finally:
        os.close(fd)


def assert_same_sparse_copy(path, blocks: list[bytes]) -> None:
    """path is the subject: its size, exactly its data regions (allocated and as lseek sees them), and
    the bytes of the data blocks. Nothing reads the 10 GiB of holes."""
    st = os.stat(path)
    assert st.st_size == SIZE
    assert data_map(path) == [(off, off + BS) for off in DATA_AT]
    with open(path, "rb") as f:
        for off, data in zip(DATA_AT, blocks):
            f.seek(off)
            assert f.read(BS) == data


def cp(*args) -> None:
    r = subprocess.run(["cp", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def lseek_err(fd: int, off: int, whence: int) -> int:
    with pytest.raises(OSError) as e:
        os.lseek(fd, off, whence)
    return e.value.errno


def test_lseek_data_and_hole_answer_exactly(workdir):
    path = workdir / "sparse"
    make_sparse(path)
    a, b = DATA_AT
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == a
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, a, os.SEEK_HOLE) == a + BS
        assert os.lseek(fd, a + 5, os.SEEK_DATA) == a + 5            # inside a data block: itself
        assert os.lseek(fd, a + BS - 1, os.SEEK_HOLE) == a + BS
        assert os.lseek(fd, a + BS, os.SEEK_DATA) == b
        assert os.lseek(fd, a + BS + 17, os.SEEK_HOLE) == a + BS + 17  # inside a hole: itself
        assert os.lseek(fd, b, os.SEEK_HOLE) == b + BS
        assert os.lseek(fd, SIZE - 1, os.SEEK_HOLE) == SIZE - 1
        assert lseek_err(fd, b + BS, os.SEEK_DATA) == errno.ENXIO     # only a hole follows
        assert lseek_err(fd, SIZE, os.SEEK_DATA) == errno.ENXIO       # at the end
        assert lseek_err(fd, SIZE, os.SEEK_HOLE) == errno.ENXIO
        assert os.lseek(fd, 0, os.SEEK_CUR) == SIZE - 1              # the last successful lseek's
    finally:
        os.close(fd)

    # a file with no hole: SEEK_HOLE finds its end, a partial last block included
    full = workdir / "full"
    full.write_bytes(os.urandom(3 * BS + 100))
    fd = os.open(full, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 3 * BS + 100
        assert os.lseek(fd, 3 * BS + 99, os.SEEK_HOLE) == 3 * BS + 100
    finally:
        os.close(fd)


def test_lseek_sees_a_hole_punched_and_a_truncate(workdir):
    path = workdir / "sparse"
    make_sparse(path)
    a, b = DATA_AT
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(a), "--length", str(BS), str(path)],
                   check=True)
    assert data_map(path) == [(b, b + BS)]
    os.truncate(path, b + 100)                          # the data block now straddles the end
    assert data_map(path) == [(b, b + 100)]
    os.truncate(path, b)
    assert data_map(path) == []


def test_cp_out_of_the_mount_reads_only_the_data(fs, workdir, tmp_path):
    src = workdir / "sparse"
    blocks = make_sparse(src)
    before = counters(fs.mnt)
    cp("--sparse=auto", src, tmp_path / "out")
    moved = delta(before, counters(fs.mnt))
    assert moved["bytes_served"] < FAR_BELOW, moved      # 8 KiB measured: the two data blocks
    assert_same_sparse_copy(tmp_path / "out", blocks)
    assert os.stat(tmp_path / "out").st_blocks * 512 < FAR_BELOW


def test_cp_into_the_mount_allocates_only_the_data(fs, workdir, tmp_path):
    src = tmp_path / "sparse"
    blocks = make_sparse(src)
    before = counters(fs.mnt)
    cp("--sparse=auto", src, workdir / "in")
    moved = delta(before, counters(fs.mnt))
    assert moved["bytes_written"] == len(DATA_AT) * BS, moved
    assert os.stat(workdir / "in").st_blocks == len(DATA_AT) * BS // 512
    assert sorted(block_map(workdir / "in")) == [off // BS for off in DATA_AT]
    assert_same_sparse_copy(workdir / "in", blocks)


def test_cp_inside_the_mount_reads_and_writes_only_the_data(fs, workdir):
    src = workdir / "sparse"
    blocks = make_sparse(src)
    before = counters(fs.mnt)
    cp(src, workdir / "copy")                            # cp's defaults: --reflink=auto --sparse=auto
    moved = delta(before, counters(fs.mnt))
    assert moved["bytes_served"] < FAR_BELOW, moved
    # cp 9.1 copies the data regions of a sparse file with read and write, not copy_file_range (see
    # the top of this module): the copy owns new blocks, as many as the source's
    assert moved["cfr_requests"] == 0 and moved["bytes_written"] == len(DATA_AT) * BS, moved
    assert os.stat(workdir / "copy").st_blocks == len(DATA_AT) * BS // 512
    assert sorted(block_map(workdir / "copy")) == [off // BS for off in DATA_AT]
    assert_same_sparse_copy(workdir / "copy", blocks)
