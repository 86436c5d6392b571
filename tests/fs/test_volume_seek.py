"""SEEK_DATA and SEEK_HOLE answered by the core from the extent map (`Volume.seek`).

Expected answers are what ext4, xfs and tmpfs give: 4 KiB granularity, the end of the file counts as a
hole, ENXIO at or past the end. The model test checks every interesting offset against an oracle built
from the extent map as `extent_map` reports it. Every test ends with fsck clean (the `vol` fixture).
"""
from __future__ import annotations

import errno
import os
import random

import pytest

from reflinkfs.core import extents as ext
from reflinkfs.errors import FsError

BS = 4096
ROOT = 1
DATA, HOLE = os.SEEK_DATA, os.SEEK_HOLE


def mkfile(v, name: bytes, size: int = 0, blocks=()) -> int:
    """A file of `size` bytes whose only mapped blocks are `blocks` (written with nonzero bytes)."""
    ino = v.create(ROOT, name, 0o644, 0, 0).ino
    for b in blocks:
        v.write(ino, b * BS, bytes([b % 251 + 1]) * BS)
    if size:
        v.truncate(ino, size)
    return ino


def enxio(v, ino: int, off: int, whence: int) -> None:
    with pytest.raises(FsError) as e:
        v.seek(ino, off, whence)
    assert e.value.errno == errno.ENXIO


def test_holes_at_start_middle_and_end(vol):
    size = 10 * BS
    ino = mkfile(vol, b"f", size, blocks=[2, 3, 6])      # hole 0-1, data 2-3, hole 4-5, data 6, hole 7-9
    assert vol.seek(ino, 0, DATA) == 2 * BS
    assert vol.seek(ino, 0, HOLE) == 0
    assert vol.seek(ino, 2 * BS, HOLE) == 4 * BS
    assert vol.seek(ino, 4 * BS, DATA) == 6 * BS
    assert vol.seek(ino, 6 * BS, HOLE) == 7 * BS
    enxio(vol, ino, 7 * BS, DATA)                          # only a hole follows
    assert vol.seek(ino, 7 * BS, HOLE) == 7 * BS
    assert vol.seek(ino, size - 1, HOLE) == size - 1


def test_offsets_inside_blocks(vol):
    ino = mkfile(vol, b"f", 8 * BS, blocks=[2, 3, 6])
    assert vol.seek(ino, 1, DATA) == 2 * BS                # inside a hole: the next data block
    assert vol.seek(ino, 2 * BS + 100, DATA) == 2 * BS + 100   # inside data: the offset itself
    assert vol.seek(ino, 3 * BS + 4095, DATA) == 3 * BS + 4095
    assert vol.seek(ino, 2 * BS + 100, HOLE) == 4 * BS
    assert vol.seek(ino, 4 * BS + 7, HOLE) == 4 * BS + 7   # inside a hole: the offset itself
    assert vol.seek(ino, 5 * BS + 4095, DATA) == 6 * BS


def test_a_file_of_only_holes(vol):
    ino = mkfile(vol, b"f", 5 * BS + 123)
    enxio(vol, ino, 0, DATA)
    enxio(vol, ino, 5 * BS, DATA)
    assert vol.seek(ino, 0, HOLE) == 0
    assert vol.seek(ino, 5 * BS + 122, HOLE) == 5 * BS + 122


def test_a_file_fully_written_is_data_up_to_its_size(vol):
    size = 3 * BS + 100                                    # the last block straddles the end
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"x" * size)
    assert vol.seek(ino, 0, DATA) == 0
    assert vol.seek(ino, 0, HOLE) == size                  # the end counts as a hole
    assert vol.seek(ino, 3 * BS + 50, DATA) == 3 * BS + 50
    assert vol.seek(ino, 3 * BS + 50, HOLE) == size
    assert vol.seek(ino, size - 1, DATA) == size - 1
    assert vol.seek(ino, size - 1, HOLE) == size


def test_offsets_at_or_past_the_end_and_negative_ones_are_enxio(vol):
    ino = mkfile(vol, b"f", 4 * BS, blocks=[0, 1])
    for off in (4 * BS, 4 * BS + 1, 1 << 50, -1, -BS):
        enxio(vol, ino, off, DATA)
        enxio(vol, ino, off, HOLE)
    empty = mkfile(vol, b"empty")
    enxio(vol, empty, 0, DATA)
    enxio(vol, empty, 0, HOLE)


def test_other_whence_and_other_file_types_are_refused(vol):
    ino = mkfile(vol, b"f", 4 * BS, blocks=[0])
    for whence in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, 5):
        with pytest.raises(FsError) as e:
            vol.seek(ino, 0, whence)
        assert e.value.errno == errno.EINVAL
    d = vol.mkdir(ROOT, b"d", 0o755, 0, 0).ino
    with pytest.raises(FsError) as e:
        vol.seek(d, 0, DATA)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FsError) as e:
        vol.seek(999_999, 0, DATA)
    assert e.value.errno == errno.ENOENT


def test_blocks_mapped_past_the_end_are_not_data(vol):
    """fallocate with KEEP_SIZE maps blocks past the end: they are no data of the file."""
    ino = mkfile(vol, b"f", 2 * BS + 10, blocks=[0])
    vol.allocate(ino, 4 * BS, 4 * BS, keep_size=True)
    assert vol.getattr(ino).size == 2 * BS + 10
    enxio(vol, ino, BS, DATA)
    assert vol.seek(ino, 0, HOLE) == BS
    vol.allocate(ino, BS, BS)                              # reserved blocks inside the file are data
    assert vol.seek(ino, BS, DATA) == BS
    assert vol.seek(ino, 0, HOLE) == 2 * BS


def test_after_truncate(vol):
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"y" * (6 * BS))
    vol.truncate(ino, 2 * BS + 1)                          # blocks 3.. unmapped, block 2 keeps one byte
    vol.truncate(ino, 8 * BS)                              # grown again: the new range is a hole
    assert vol.seek(ino, 0, HOLE) == 3 * BS
    enxio(vol, ino, 3 * BS, DATA)
    assert vol.seek(ino, 2 * BS + 1, DATA) == 2 * BS + 1   # block 2 is still mapped
    vol.truncate(ino, BS + 5)
    assert vol.seek(ino, 0, HOLE) == BS + 5
    vol.truncate(ino, 0)
    enxio(vol, ino, 0, DATA)


def test_after_punch_hole(vol):
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"z" * (10 * BS))
    vol.punch_hole(ino, 3 * BS, 2 * BS)                    # whole blocks 3 and 4
    assert vol.seek(ino, 0, HOLE) == 3 * BS
    assert vol.seek(ino, 3 * BS, DATA) == 5 * BS
    vol.punch_hole(ino, 7 * BS + 10, BS)                   # no whole block: 7 and 8 stay data
    assert vol.seek(ino, 5 * BS, HOLE) == 10 * BS
    vol.punch_hole(ino, 8 * BS, 2 * BS)                    # the tail
    assert vol.seek(ino, 5 * BS, HOLE) == 8 * BS
    enxio(vol, ino, 8 * BS, DATA)


def test_after_clone_of_a_range(vol):
    src = mkfile(vol, b"src", 8 * BS, blocks=[1, 2, 5])
    dst = mkfile(vol, b"dst", 16 * BS, blocks=[0])
    assert vol.clone_range(src, 0, dst, 8 * BS, 8 * BS) == 8 * BS   # src's holes come along as holes
    assert vol.seek(dst, 0, HOLE) == BS
    assert vol.seek(dst, BS, DATA) == 9 * BS
    assert vol.seek(dst, 9 * BS, HOLE) == 11 * BS
    assert vol.seek(dst, 11 * BS, DATA) == 13 * BS
    assert vol.seek(dst, 13 * BS, HOLE) == 14 * BS
    enxio(vol, dst, 14 * BS, DATA)
    vol.clone_range(dst, 0, dst, BS, BS)                    # a clone into the hole fills it
    assert vol.seek(dst, 0, HOLE) == 2 * BS


def test_a_64_tib_file_answers_from_its_map(vol):
    """Nothing walks the blocks: data at the end of the largest file is found directly."""
    size = 1 << 46
    ino = mkfile(vol, b"big", size)
    vol.write(ino, size - BS - 7, b"tail")                  # the second-to-last block
    assert vol.seek(ino, 0, DATA) == size - 2 * BS
    assert vol.seek(ino, size - 2 * BS, HOLE) == size - BS
    assert vol.seek(ino, 0, HOLE) == 0


def test_cost_is_queries_per_extent_walked_not_per_block(vol):
    """A run of 600 logically contiguous extents (physically interleaved with another file's, so none
    merge): SEEK_HOLE walks them in batches growing to SCAN_BATCH; SEEK_DATA is two lookups however big
    the map."""
    vol.small_file_bytes = 1 << 62         # both in segment 0, so that their blocks interleave
    a = vol.create(ROOT, b"a", 0o644, 0, 0).ino
    b = vol.create(ROOT, b"b", 0o644, 0, 0).ino
    n = 600
    for i in range(n):
        vol.write(a, i * BS, b"a" * BS)
        vol.write(b, i * BS, b"b" * BS)
    vol.truncate(a, 2 * n * BS)
    assert len(vol.extent_map(a)) == n
    statements = []
    vol.db.set_trace_callback(statements.append)
    try:
        assert vol.seek(a, 0, HOLE) == n * BS
        hole_queries = len(statements)
        statements.clear()
        assert vol.seek(a, n * BS - 1, DATA) == n * BS - 1
        data_queries = len(statements)
        statements.clear()
        enxio(vol, a, n * BS, DATA)
        past_queries = len(statements)
    finally:
        vol.db.set_trace_callback(None)
    # the attributes, the first extent, batches of 1, 4, 16, 64, then SCAN_BATCH
    assert hole_queries <= 2 + 4 + (n // ext.SCAN_BATCH + 1)
    assert data_queries <= 3 and past_queries <= 3


def oracle(v, ino: int, off: int, whence: int) -> int | None:
    """The expected answer (None: ENXIO), from a set of the mapped blocks, walking byte offsets."""
    size = v.getattr(ino).size
    if off < 0 or off >= size:
        return None
    mapped = {lb + i for lb, _, n, _ in v.extent_map(ino) for i in range(n)}
    pos = off
    while pos < size:
        if (pos // BS in mapped) == (whence == DATA):
            return pos
        pos = (pos // BS + 1) * BS
    return size if whence == HOLE else None


def test_random_maps_agree_with_an_oracle(vol):
    rng = random.Random(7)
    files = [mkfile(vol, b"f%d" % i) for i in range(3)]
    nblocks = 40
    for step in range(150):
        ino = rng.choice(files)
        op = rng.random()
        off = rng.randrange(nblocks * BS)
        length = rng.randrange(1, 6 * BS)
        if op < 0.4:
            vol.write(ino, off, bytes([step % 255 + 1]) * length)
        elif op < 0.55:
            vol.punch_hole(ino, off, length)
        elif op < 0.7:
            vol.truncate(ino, off)
        elif op < 0.85:
            src = rng.choice(files)
            if src != ino:
                vol.clone_range(src, rng.randrange(nblocks) * BS, ino, rng.randrange(nblocks) * BS, length)
        else:
            vol.allocate(ino, off, length, keep_size=rng.random() < 0.5)
        size = vol.getattr(ino).size
        offsets = {0, size - 1, size, -1}
        for lb, _, n, _ in vol.extent_map(ino):
            for b in (lb, lb + n):
                offsets.update({b * BS - 1, b * BS, b * BS + 1})
        for o in sorted(offsets):
            for whence in (DATA, HOLE):
                want = oracle(vol, ino, o, whence)
                if want is None:
                    enxio(vol, ino, o, whence)
                else:
                    assert vol.seek(ino, o, whence) == want, (step, o, whence)
