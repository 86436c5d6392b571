"""The block caches driven through the core (no FUSE): sharing by physical extent, coherence, integrity,
eviction, readahead, statistics, and the memory shape of the issue.

Every volume is opened through the `open_volume` fixture, so each test ends with fsck (data checksums
included) clean, except the ones that damage the data file on purpose.

Identity, not equality: the shared cache must hand every file that maps a physical range the *same*
buffer object. `Volume.read` returns a memoryview; for a read inside one cache unit its `.obj` is the
cached `bytes` object itself, so `a.obj is b.obj` is the claim, and the plain (inode) cache must fail it.
"""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from reflinkfs.core.cache import UNIT, UNIT_BLOCKS, SharedCache, make_io
from reflinkfs.core.datafile import locate, segment_path
from reflinkfs.core.volume import Volume
from reflinkfs.errors import FsError

BS = 4096
MiB = 1 << 20
ROOT = 1
MODES = ["shared", "inode"]


# -- helpers -------------------------------------------------------------------------------------
def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def mkfile(v: Volume, name: bytes, data: bytes) -> int:
    ino = v.create(ROOT, name, 0o644, 0, 0).ino
    # written in 1 MiB pieces, as the kernel would hand them over
    for off in range(0, len(data), MiB):
        v.write(ino, off, data[off:off + MiB])
    return ino


def clone(v: Volume, src: int, name: bytes) -> int:
    ino = v.create(ROOT, name, 0o644, 0, 0).ino
    v.clone_file(src, ino)
    return ino


def read_seq(v: Volume, ino: int, req: int, after_each=None) -> tuple[bytes, int]:
    """Read a whole file front to back in requests of `req` bytes; return (contents, requests)."""
    size = v.getattr(ino).size
    out, n = [], 0
    for off in range(0, size, req):
        out.append(bytes(v.read(ino, off, req)))
        n += 1
        if after_each:
            after_each()
    return b"".join(out), n


def pblock_of(v: Volume, ino: int, lblock: int) -> int:
    for lb, pb, n, _ in v.extent_map(ino):
        if lb <= lblock < lb + n:
            return pb + lblock - lb
    raise AssertionError(f"logical block {lblock} of inode {ino} is not mapped")


def st(v: Volume) -> dict:
    return v.io.stats()


def datafile_reads(v: Volume) -> int:
    return v.data.stats().reads


def open_cached(open_volume, mode: str, budget: int = 256 * MiB, policy: str = "2q") -> Volume:
    return open_volume(io_factory=make_io(mode, budget, policy))


def corrupt(v: Volume, pblock: int, at: int = 100) -> None:
    """Flip three bytes of a physical block in its segment's file, behind the cache's back."""
    seg, pos = locate(pblock)
    fd = os.open(segment_path(v.data.path, seg), os.O_RDWR)
    try:
        old = os.pread(fd, 3, pos + at)
        os.pwrite(fd, bytes(x ^ 0xFF for x in old), pos + at)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- one buffer for every clone ------------------------------------------------------------------
def test_shared_mode_hands_every_clone_the_same_buffer(open_volume):
    v = open_cached(open_volume, "shared")
    data = rnd(4 * UNIT, 1)
    a = mkfile(v, b"a", data)
    b = clone(v, a, b"b")
    c = clone(v, a, b"c")
    # d maps the same physical blocks three blocks further on: logical units no longer line up with
    # physical ones, and the cache key is physical
    d = v.create(ROOT, b"d", 0o644, 0, 0).ino
    assert v.clone_range(a, 0, d, 3 * BS, len(data)) == len(data)

    ra = v.read(a, 5 * BS, BS)
    rb = v.read(b, 5 * BS, BS)
    rc = v.read(c, 5 * BS + 10, 100)
    rd = v.read(d, 8 * BS, BS)                    # logical block 8 of d is block 5 of a
    assert isinstance(ra, memoryview)
    assert bytes(ra) == bytes(rb) == bytes(rd) == data[5 * BS:6 * BS]
    assert bytes(rc) == data[5 * BS + 10:5 * BS + 110]
    assert ra.obj is rb.obj is rc.obj is rd.obj
    assert ra.obj is v.io.lookup_unit(pblock_of(v, a, 5))
    # another block of the same unit, read through another clone: the same object again
    assert v.read(b, 9 * BS, BS).obj is ra.obj
    # a different physical unit is a different object
    other = v.read(c, UNIT + BS, BS)
    assert other.obj is not ra.obj and bytes(other) == data[UNIT + BS:UNIT + 2 * BS]
    s = st(v)
    assert s["misses"] == 2 and s["resident_bytes"] == 2 * UNIT


def test_inode_mode_keeps_a_copy_per_file(open_volume):
    v = open_cached(open_volume, "inode")
    data = rnd(4 * UNIT, 2)
    a = mkfile(v, b"a", data)
    b = clone(v, a, b"b")
    ra, rb = v.read(a, 5 * BS, BS), v.read(b, 5 * BS, BS)
    assert bytes(ra) == bytes(rb) == data[5 * BS:6 * BS]
    assert ra.obj is not rb.obj
    assert v.read(a, 9 * BS, BS).obj is ra.obj       # within one file the unit is shared, of course
    s = st(v)
    assert s["resident_bytes"] == 2 * UNIT and s["distinct_physical_bytes"] == UNIT


# -- coherence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_write_to_one_clone_leaves_the_other_alone(open_volume, mode):
    v = open_cached(open_volume, mode)
    old = rnd(4 * UNIT, 3)
    a = mkfile(v, b"a", old)
    v.commit()                                   # a's blocks are committed: writes copy on write
    b = clone(v, a, b"b")
    held = v.read(a, UNIT, BS)                   # a reader still holding a view of the old bytes
    assert read_seq(v, a, MiB)[0] == old and read_seq(v, b, MiB)[0] == old

    new = rnd(BS + 300, 4)
    v.write(b, UNIT + 1000, new)                 # unaligned: head and tail blocks are merged
    want_b = old[:UNIT + 1000] + new + old[UNIT + 1000 + len(new):]
    assert read_seq(v, b, MiB)[0] == want_b
    assert read_seq(v, a, MiB)[0] == old
    assert bytes(held) == old[UNIT:UNIT + BS]    # buffers are never changed in place

    v.write(a, 3 * UNIT, b"A" * BS)
    assert read_seq(v, a, MiB)[0] == old[:3 * UNIT] + b"A" * BS + old[3 * UNIT + BS:]
    assert read_seq(v, b, MiB)[0] == want_b


@pytest.mark.parametrize("mode", MODES)
def test_in_place_write_of_fresh_blocks_is_seen(open_volume, mode):
    """Blocks allocated in the open transaction are overwritten in place: same physical unit, new bytes."""
    v = open_cached(open_volume, mode)
    f = mkfile(v, b"f", rnd(2 * UNIT, 5))
    pb = pblock_of(v, f, 3)
    assert bytes(v.read(f, 3 * BS, BS)) == rnd(2 * UNIT, 5)[3 * BS:4 * BS]
    v.write(f, 3 * BS, b"n" * BS)
    assert pblock_of(v, f, 3) == pb              # really in place
    assert bytes(v.read(f, 3 * BS, BS)) == b"n" * BS


@pytest.mark.parametrize("mode", MODES)
def test_clone_over_a_cached_file_replaces_what_it_reads(open_volume, mode):
    v = open_cached(open_volume, mode)
    a = mkfile(v, b"a", rnd(2 * UNIT, 6))
    b = mkfile(v, b"b", rnd(2 * UNIT, 7))
    assert read_seq(v, b, MiB)[0] == rnd(2 * UNIT, 7)
    v.clone_file(a, b)
    assert read_seq(v, b, MiB)[0] == rnd(2 * UNIT, 6)


def test_shared_cache_drops_exactly_what_is_freed(open_volume):
    """truncate, punch and unlink drop a physical unit when its last reference goes, not before."""
    v = open_cached(open_volume, "shared")
    data = rnd(8 * UNIT, 8)
    a = mkfile(v, b"a", data)
    assert pblock_of(v, a, 0) % UNIT_BLOCKS == 0   # units of a hold nothing else: the test can count
    b = clone(v, a, b"b")
    views = {u: v.read(a, u * UNIT, BS) for u in range(8)}
    read_seq(v, b, MiB)
    unit = {u: pblock_of(v, a, u * UNIT_BLOCKS) for u in range(8)}
    resident = lambda: {u for u in range(8) if v.io.lookup_unit(unit[u]) is not None}  # noqa: E731
    assert resident() == set(range(8))

    v.truncate(a, 4 * UNIT)                      # b still maps units 4..7
    assert resident() == set(range(8))
    assert v.read(b, 6 * UNIT, BS).obj is views[6].obj
    v.truncate(b, 2 * UNIT)                      # now nobody maps 4..7; a still maps 2, 3
    assert resident() == {0, 1, 2, 3}
    assert v.read(a, 3 * UNIT, BS).obj is views[3].obj

    v.punch_hole(a, UNIT, UNIT)                  # b still maps unit 1
    assert resident() == {0, 1, 2, 3}
    v.punch_hole(b, UNIT, UNIT)
    assert resident() == {0, 2, 3}
    assert bytes(v.read(a, UNIT, UNIT)) == bytes(UNIT) == bytes(v.read(b, UNIT, UNIT))

    v.unlink(ROOT, b"a")                         # units 2, 3 were a's alone; 0 is still b's
    assert resident() == {0}
    assert v.read(b, 0, BS).obj is views[0].obj
    v.unlink(ROOT, b"b")
    assert resident() == set()
    assert st(v)["resident_bytes"] == 0


def test_inode_cache_drops_what_a_file_no_longer_maps(open_volume):
    v = open_cached(open_volume, "inode")
    a = mkfile(v, b"a", rnd(8 * UNIT, 9))
    b = clone(v, a, b"b")
    read_seq(v, a, MiB)
    read_seq(v, b, MiB)
    assert st(v)["entries"] == 16

    v.truncate(a, 4 * UNIT + 100)                # a keeps units 0..4; its last unit changed
    assert st(v)["entries"] == 8 + 4             # b's 8, a's 0..3 (unit 4 is reloaded on demand)
    before = st(v)
    for u in (3, 2, 1, 0):                       # backwards: no readahead muddles the count
        assert bytes(v.read(a, u * UNIT, UNIT)) == rnd(8 * UNIT, 9)[u * UNIT:(u + 1) * UNIT]
    assert (st(v)["hits"] - before["hits"], st(v)["misses"] - before["misses"]) == (4, 0), \
        "units below the new size were dropped by the truncate"
    assert read_seq(v, a, UNIT)[0] == rnd(8 * UNIT, 9)[:4 * UNIT + 100]

    v.punch_hole(b, UNIT, UNIT)
    assert st(v)["entries"] == 13 - 1
    assert bytes(v.read(b, UNIT, UNIT)) == bytes(UNIT)

    v.unlink(ROOT, b"a")
    assert st(v)["entries"] == 8                 # b's units only (its punched unit was read again)
    v.unlink(ROOT, b"b")
    assert st(v)["entries"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_freed_blocks_are_dropped_and_reuse_reads_the_new_data(open_volume, mode):
    v = open_cached(open_volume, mode)
    a = mkfile(v, b"a", rnd(4 * UNIT, 10))
    v.commit()
    read_seq(v, a, MiB)
    old_pbs = {pblock_of(v, a, lb) for lb in range(0, 4 * UNIT_BLOCKS, UNIT_BLOCKS)}
    v.truncate(a, 0)
    assert st(v)["resident_bytes"] == 0
    v.commit()                                   # the blocks become free and can be handed out again
    v.write(a, 0, rnd(4 * UNIT, 11))             # at the same places of its own segment
    assert old_pbs & {pblock_of(v, a, lb) for lb in range(0, 4 * UNIT_BLOCKS, UNIT_BLOCKS)}, \
        "the allocator did not reuse the freed blocks; the test proves nothing"
    assert read_seq(v, a, MiB)[0] == rnd(4 * UNIT, 11)


@pytest.mark.parametrize("mode", MODES)
def test_freed_blocks_of_segment_0_are_dropped_and_reuse_reads_the_new_data(open_volume, mode):
    v = open_cached(open_volume, mode)
    v.small_file_bytes = 1 << 62                 # small files share segment 0, which reuses freed runs
    a = mkfile(v, b"a", rnd(4 * UNIT, 10))
    v.commit()
    read_seq(v, a, MiB)
    old_pbs = {pblock_of(v, a, lb) for lb in range(0, 4 * UNIT_BLOCKS, UNIT_BLOCKS)}
    v.unlink(ROOT, b"a")
    assert st(v)["resident_bytes"] == 0
    v.commit()
    c = mkfile(v, b"c", rnd(4 * UNIT, 11))
    assert old_pbs & {pblock_of(v, c, lb) for lb in range(0, 4 * UNIT_BLOCKS, UNIT_BLOCKS)}, \
        "the allocator did not reuse the freed blocks; the test proves nothing"
    assert read_seq(v, c, MiB)[0] == rnd(4 * UNIT, 11)


# -- integrity -----------------------------------------------------------------------------------
@pytest.mark.damages_store
@pytest.mark.parametrize("mode", MODES)
def test_damage_after_caching_is_eio_once_the_unit_is_reloaded(open_volume, mode):
    """A cached unit was verified when it was loaded; once it leaves the cache, a flipped byte in the
    data file is an I/O error naming the file and offset, never wrong bytes."""
    v = open_cached(open_volume, mode, budget=4 * UNIT)
    data = rnd(4 * UNIT, 12)
    a = mkfile(v, b"a", data)
    other = mkfile(v, b"other", rnd(16 * UNIT, 13))
    v.commit()
    assert bytes(v.read(a, 0, len(data))) == data
    corrupt(v, pblock_of(v, a, 3 * UNIT_BLOCKS + 2))
    assert bytes(v.read(a, 0, len(data))) == data     # still the verified cached copy

    read_seq(v, other, UNIT)                          # pushes a's units out of the 4-unit budget
    assert st(v)["evictions"] >= 4
    with pytest.raises(FsError) as e:
        v.read(a, 3 * UNIT + 2 * BS + 7, 10)
    assert e.value.errno == errno.EIO
    assert f"inode {a}" in e.value.message and f"byte offset {3 * UNIT + 2 * BS}" in e.value.message
    assert bytes(v.read(a, 0, 3 * UNIT)) == data[:3 * UNIT]       # the rest still reads
    assert bytes(v.read(a, 3 * UNIT + 3 * BS, BS)) == data[3 * UNIT + 3 * BS:3 * UNIT + 4 * BS]


@pytest.mark.damages_store
@pytest.mark.parametrize("mode", MODES)
def test_readahead_over_a_damaged_block_fails_only_the_read_that_asks_for_it(open_volume, mode):
    v = open_cached(open_volume, mode)
    data = rnd(16 * UNIT, 16)
    f = mkfile(v, b"f", data)
    v.commit()
    corrupt(v, pblock_of(v, f, 6 * UNIT_BLOCKS + 3))
    for u in range(4):                           # sequential: the window reaches the damaged unit 6
        assert bytes(v.read(f, u * UNIT, UNIT)) == data[u * UNIT:(u + 1) * UNIT]
    assert st(v)["readahead_loads"] > 0
    with pytest.raises(FsError) as e:
        v.read(f, 6 * UNIT, UNIT)
    assert e.value.errno == errno.EIO and f"byte offset {6 * UNIT + 3 * BS}" in e.value.message
    # reads over several cached units: the damaged block fails them wherever it falls in the read
    for off, size in ((5 * UNIT, 3 * UNIT), (5 * UNIT + BS, UNIT + 4 * BS), (6 * UNIT + 3 * BS, 2 * UNIT)):
        with pytest.raises(FsError) as e:
            v.read(f, off, size)
        assert e.value.errno == errno.EIO and f"byte offset {6 * UNIT + 3 * BS}" in e.value.message
    # the good blocks of the damaged unit still read, in either mode
    assert bytes(v.read(f, 6 * UNIT + 4 * BS, UNIT + BS)) == data[6 * UNIT + 4 * BS:7 * UNIT + 5 * BS]
    assert bytes(v.read(f, 5 * UNIT + BS, UNIT + 2 * BS)) == data[5 * UNIT + BS:6 * UNIT + 3 * BS]
    assert bytes(v.read(f, 6 * UNIT + 4 * BS, 2 * BS)) == data[6 * UNIT + 4 * BS:6 * UNIT + 6 * BS]
    assert bytes(v.read(f, 6 * UNIT, 3 * BS)) == data[6 * UNIT:6 * UNIT + 3 * BS]


@pytest.mark.damages_store
def test_shared_unit_serves_good_blocks_of_one_file_beside_a_damaged_block_of_another(open_volume):
    v = open_cached(open_volume, "shared")
    v.small_file_bytes = 1 << 62                 # small files packed into segment 0
    a = mkfile(v, b"a", rnd(8 * BS, 14))
    b = mkfile(v, b"b", rnd(8 * BS, 15))
    assert pblock_of(v, a, 0) // UNIT_BLOCKS == pblock_of(v, b, 0) // UNIT_BLOCKS   # one physical unit
    v.commit()
    corrupt(v, pblock_of(v, b, 1))
    assert bytes(v.read(a, 0, 8 * BS)) == rnd(8 * BS, 14)
    with pytest.raises(FsError) as e:
        v.read(b, 0, 8 * BS)
    assert e.value.errno == errno.EIO and f"inode {b}" in e.value.message
    assert bytes(v.read(b, 2 * BS, 6 * BS)) == rnd(8 * BS, 15)[2 * BS:]


# -- eviction ------------------------------------------------------------------------------------
def _scan_sequence(v: Volume) -> dict:
    """A hot set is read, falls out of probation under other traffic, is read again (a re-reference
    from outside the scan that brought it in), then one huge sequential read goes by; return the
    statistics of the final read of the hot set."""
    hot = mkfile(v, b"hot", rnd(4 * UNIT, 20))
    filler = mkfile(v, b"filler", rnd(96 * UNIT, 21))       # 1.5 x the budget
    scan = mkfile(v, b"scan", rnd(256 * UNIT, 22))          # 4 x the budget
    budget = st(v)["budget_bytes"]

    def bounded():
        s = st(v)
        assert s["resident_bytes"] <= budget and s["resident_bytes"] == s["entries"] * UNIT

    assert bytes(v.read(hot, 0, 4 * UNIT)) == rnd(4 * UNIT, 20)
    read_seq(v, filler, 128 << 10, bounded)
    assert bytes(v.read(hot, 0, 4 * UNIT)) == rnd(4 * UNIT, 20)
    read_seq(v, scan, 128 << 10, bounded)
    before, reads = st(v), datafile_reads(v)
    assert bytes(v.read(hot, 0, 4 * UNIT)) == rnd(4 * UNIT, 20)
    after = st(v)
    return {"hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"],
            "datafile_reads": datafile_reads(v) - reads, "evictions": after["evictions"]}


@pytest.mark.parametrize("mode", MODES)
def test_2q_hot_set_survives_a_huge_sequential_read(open_volume, mode):
    v = open_cached(open_volume, mode, budget=64 * UNIT, policy="2q")
    r = _scan_sequence(v)
    assert r["evictions"] > 250
    assert r == {**r, "hits": 4, "misses": 0, "datafile_reads": 0}


@pytest.mark.parametrize("mode", MODES)
def test_lru_loses_the_hot_set_to_the_same_sequential_read(open_volume, mode):
    v = open_cached(open_volume, mode, budget=64 * UNIT, policy="lru")
    r = _scan_sequence(v)
    assert r["hits"] == 0 and r["misses"] == 4


@pytest.mark.parametrize("policy", ["2q", "lru"])
@pytest.mark.parametrize("mode", MODES)
def test_budget_is_never_exceeded_and_eviction_work_is_bounded(open_volume, mode, policy):
    v = open_cached(open_volume, mode, budget=10 * UNIT, policy=policy)
    contents = [rnd(40 * UNIT + 123, 30 + i) for i in range(3)]
    files = [mkfile(v, f"f{i}".encode(), data) for i, data in enumerate(contents)]
    files.append(clone(v, files[0], b"c"))
    contents.append(contents[0])
    rng = random.Random(0)
    for _ in range(300):
        ino = rng.choice(files)
        off = rng.randrange(0, 40 * UNIT)
        before = st(v)
        data = bytes(v.read(ino, off, rng.choice([BS, 3 * BS + 5, UNIT, 5 * UNIT])))
        assert data == contents[files.index(ino)][off:off + len(data)]
        s = st(v)
        assert s["resident_bytes"] <= 10 * UNIT == s["budget_bytes"]
        loaded = (s["misses"] - before["misses"]) + (s["readahead_loads"] - before["readahead_loads"])
        assert s["evictions"] - before["evictions"] <= 2 * loaded
    assert st(v)["evictions"] > 0


# -- readahead -----------------------------------------------------------------------------------
@pytest.mark.parametrize("req", [BS, 64 << 10, 128 << 10, MiB])
def test_sequential_reads_are_served_by_fewer_larger_datafile_reads(open_volume, req):
    """A sequential reader reads every byte once, in data-file requests no smaller than its own or the
    loader's (SharedCache.JOB_UNITS); when its requests are smaller than a loader's read, it costs one
    data-file request per loader read (plus its first two, and one cut short); after the first two requests (a read is sequential when it
    continues the one before), every unit comes from the loader threads."""
    v = open_cached(open_volume, "shared")
    data = rnd(8 * MiB, 40)
    f = mkfile(v, b"f", data)
    v.commit()
    r0 = datafile_reads(v)
    got, requests = read_seq(v, f, req)
    assert got == data
    reads = datafile_reads(v) - r0
    s = st(v)
    assert s["readahead_loads"] >= (len(data) - 2 * max(req, UNIT)) // UNIT
    assert v.data.stats().bytes_read / reads >= min(req, SharedCache.JOB_UNITS * UNIT)
    job = SharedCache.JOB_UNITS * UNIT
    if req < job:
        assert reads <= len(data) // job + 3, f"{reads} data-file reads for {requests} requests of {req} bytes"
    assert v.data.stats().bytes_read == len(data)       # nothing read twice


def test_a_unit_on_its_way_is_dropped_when_its_blocks_are_written(open_volume):
    """The loader has read a unit; before it reaches the cache, the loop overwrites a block of it in place
    (fresh blocks: no commit since they were written). The unit must be dropped on arrival, never served."""
    v = open_cached(open_volume, "shared")
    data = rnd(4 * MiB, 60)
    f = mkfile(v, b"f", data)
    real, read_done, release, timed_out = v.data.read, threading.Event(), threading.Event(), []

    def held(pblock, nblocks, buf=None):
        out = real(pblock, nblocks, buf)
        if buf is not None:                      # the loader's read: hold its result
            read_done.set()
            if not release.wait(10):
                timed_out.append(pblock)
        return out

    v.data.read = held
    assert bytes(v.read(f, 0, UNIT)) == data[:UNIT]
    assert bytes(v.read(f, UNIT, UNIT)) == data[UNIT:2 * UNIT]      # sequential: units ahead go to the loader
    assert read_done.wait(10)
    target = 3 * UNIT + 5 * BS                   # a whole block inside the first unit on its way
    pb = pblock_of(v, f, target // BS)
    new = rnd(BS, 61)
    v.write(f, target, new)
    assert pblock_of(v, f, target // BS) == pb, "the test needs an in-place write"
    release.set()
    want = data[:target] + new + data[target + BS:]
    assert bytes(v.read(f, 3 * UNIT, UNIT)) == want[3 * UNIT:4 * UNIT]
    v.io.settle()
    assert not timed_out, "the loop waited for the held loader"
    assert bytes(v.read(f, 0, len(data))) == want
    assert v.io.lookup_unit(pb)[5 * BS:6 * BS] == new


@pytest.mark.parametrize("mode", MODES)
def test_readahead_only_for_sequential_access(open_volume, mode):
    v = open_cached(open_volume, mode)
    data = rnd(4 * MiB, 41)
    f = mkfile(v, b"f", data)
    offsets = list(range(0, len(data), 2 * UNIT))
    random.Random(1).shuffle(offsets)
    for off in offsets:                          # never where the previous read ended
        assert bytes(v.read(f, off, BS)) == data[off:off + BS]
    assert st(v)["readahead_loads"] == 0
    g = clone(v, f, b"g")
    read_seq(v, g, 16 << 10)
    assert st(v)["readahead_loads"] > 0


# -- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_statistics_add_up(open_volume, mode):
    v = open_cached(open_volume, mode, budget=24 * UNIT)
    data = rnd(32 * UNIT, 50)
    a = mkfile(v, b"a", data)
    b = clone(v, a, b"b")
    v.commit()
    served = 0
    unit_refs = 0
    for ino, off, n in [(a, 0, 32 * UNIT), (b, 0, 8 * UNIT), (b, 8 * UNIT, 8 * UNIT), (a, 5 * UNIT, BS),
                        (b, 31 * UNIT, UNIT), (a, 2 * UNIT + BS, 2 * UNIT)]:
        assert bytes(v.read(ino, off, n)) == data[off:off + n]
        b0, b1 = off // BS, -(-(off + n) // BS)
        served += (b1 - b0) * BS
        unit_refs += (b1 - 1) // UNIT_BLOCKS - b0 // UNIT_BLOCKS + 1
    s = st(v)
    loaded = s["misses"] + s["readahead_loads"]
    assert s["bytes_served"] == served
    assert s["hits"] + s["misses"] == unit_refs
    assert loaded == s["entries"] + s["evictions"]           # nothing was dropped: loaded = kept + evicted
    assert v.data.stats().bytes_read == loaded * UNIT        # every load is one whole, fully mapped unit
    assert s["resident_bytes"] == s["entries"] * UNIT <= s["budget_bytes"] == 24 * UNIT
    if mode == "shared":
        assert s["distinct_physical_bytes"] == s["resident_bytes"]
    else:
        assert s["distinct_physical_bytes"] <= s["resident_bytes"]
    assert (s["mode"], s["policy"], s["unit_bytes"]) == (mode, "2q", UNIT)


# -- the shape of the issue ----------------------------------------------------------------------
@pytest.mark.parametrize("mode, lo, hi", [("shared", 0.0, 1.05), ("inode", 3.5, 4.2)])
def test_four_reflinked_copies_cost_one_copy_of_memory_in_shared_mode(open_volume, mode, lo, hi):
    v = open_cached(open_volume, mode, budget=256 * MiB)
    data = rnd(32 * MiB, 60)
    base = mkfile(v, b"base", data)
    copies = [base] + [clone(v, base, f"copy{i}".encode()) for i in range(1, 4)]
    v.commit()
    physical = v.usage()["physical_bytes"]
    assert physical == len(data)
    for ino in copies:
        assert read_seq(v, ino, MiB)[0] == data
    s = st(v)
    ratio = s["resident_bytes"] / physical
    assert lo <= ratio <= hi, f"{mode}: resident {s['resident_bytes']} bytes = {ratio:.2f} x the file"
    assert s["evictions"] == 0
    if mode == "shared":
        assert v.data.stats().bytes_read <= 1.05 * physical    # the data file was read once
        assert all(v.read(ino, 7 * MiB, BS).obj is v.read(base, 7 * MiB, BS).obj for ino in copies)
    else:
        assert v.data.stats().bytes_read >= 3.5 * physical
