"""The data file's writer thread: queued writes are seen by reads, land in order, and surface errors.

A writer that can be held (`Gate`) makes the in-between states deterministic: while it is held, every
write sits in the queue and the file itself still has the old bytes.
"""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from reflinkfs.core import datafile
from reflinkfs.core.datafile import DataFile
from reflinkfs.errors import FsError

BS = 4096


def blocks(*fill: int) -> bytes:
    return b"".join(bytes([f]) * BS for f in fill)


def on_disk(df: DataFile, pblock: int, n: int) -> bytes:
    return os.pread(df._fd, n * BS, pblock * BS)


class Gate:
    """Wraps DataFile._apply: the writer thread blocks until opened; the failures queued in `fail` are
    raised first, one per call (from any thread)."""

    def __init__(self, df: DataFile):
        self.df, self.real = df, df._apply
        self.open = threading.Event()
        self.fail: list[int] = []
        self.calls: list[int] = []
        df._apply = self

    def __call__(self, pblock: int, data) -> None:
        if threading.current_thread() is self.df._writer:
            self.open.wait()
        self.calls.append(pblock)
        if self.fail:
            raise OSError(self.fail.pop(0), os.strerror(errno.EIO))
        self.real(pblock, data)


@pytest.fixture
def df(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"")
    d = DataFile(str(path))
    d.ensure_size(64)
    yield d
    d.close()


def test_reads_see_queued_writes_newest_last_and_the_file_gets_them_in_order(df):
    gate = Gate(df)
    df.write(0, blocks(1, 1, 1, 1))
    df.write(2, blocks(2))              # overlaps the first write
    df.write(3, blocks(3, 3))           # overlaps it and runs past it
    assert df.unsynced
    want = blocks(1, 1, 2, 3, 3, 0)
    assert df.read(0, 6) == want
    assert df.read(2, 1) == blocks(2)   # a read inside one queued write
    assert on_disk(df, 0, 6) == bytes(6 * BS), "the writer was held: nothing may be in the file yet"
    assert df._backlog == 7 * BS
    gate.open.set()
    df.sync()
    assert not df.unsynced
    assert gate.calls == [0, 2, 3]
    assert on_disk(df, 0, 6) == want
    assert df.read(0, 6) == want
    assert df._backlog == 0 and not df._queue


def test_a_failed_write_is_retried_in_order_and_nothing_overtakes_it(df):
    gate = Gate(df)
    gate.fail = [errno.EIO]                    # the writer's first write fails
    df.write(5, blocks(7))
    df.write(5, blocks(8))                     # the same block again: must land after the failed one
    gate.open.set()
    deadline = time.monotonic() + 10
    while df._error is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert df._error is not None and len(df._queue) == 2, "the writer stops at the failed head"
    assert df.read(5, 1) == blocks(8), "reads still see the queued writes"
    df.sync()                                  # retries the head here, then lets the writer go on
    assert on_disk(df, 5, 1) == blocks(8)
    assert gate.calls == [5, 5, 5]


def test_a_write_that_keeps_failing_fails_the_sync_and_stays_queued(df):
    gate = Gate(df)
    gate.fail = [errno.EIO, errno.EIO]         # the writer's attempt and the sync's retry
    df.write(1, blocks(4))
    gate.open.set()
    with pytest.raises(FsError) as e:
        df.sync()
    assert e.value.errno == errno.EIO and "block 1" in e.value.message
    assert df.unsynced and df.read(1, 1) == blocks(4)
    df.sync()                                  # the disk came back: the same bytes land
    assert on_disk(df, 1, 1) == blocks(4) and not df.unsynced


def test_room_turns_false_past_the_backlog_and_comes_back_once_written(df, monkeypatch):
    monkeypatch.setattr(datafile, "BACKLOG", 2 * BS)
    gate = Gate(df)
    df.write(0, blocks(1))
    assert df.room()
    df.write(1, blocks(1))
    assert not df.room()
    assert not df.wait_room(timeout=0.05)
    gate.open.set()
    assert df.wait_room(timeout=10)
    df.sync()


def test_a_sync_that_began_before_a_write_does_not_cover_it(df):
    gate = Gate(df)
    df.write(0, blocks(1))
    t = threading.Thread(target=df.sync)
    t.start()
    time.sleep(0.05)                           # the sync is waiting for the held writer
    df.write(1, blocks(2))
    gate.open.set()
    t.join()
    assert df.unsynced, "the second write came after the sync took its mark"
    df.sync()
    assert not df.unsynced and on_disk(df, 0, 2) == blocks(1, 2)


def test_the_writer_grows_the_file_ahead_of_need(df):
    size = df._size
    df.ensure_size(size // BS)                 # within half a step of the end: ask the writer for more
    deadline = time.monotonic() + 10
    while os.fstat(df._fd).st_size <= size and time.monotonic() < deadline:
        time.sleep(0.001)
    assert os.fstat(df._fd).st_size == size + datafile.GROW_STEP
    df.ensure_size(1)                          # far from the end: nothing asked
    assert df._grow_to == 0


def test_a_barrier_runs_after_the_writes_before_it_and_before_those_after_it(df):
    gate = Gate(df)
    seen = []
    df.write(0, blocks(1))
    b = df.barrier(lambda: seen.append(on_disk(df, 0, 2)))
    df.write(1, blocks(2))
    gate.open.set()
    df.wait_for(b)
    assert b.done and seen == [blocks(1, 0)]
    df.sync()
    assert on_disk(df, 0, 2) == blocks(1, 2)


def test_a_failing_barrier_stops_the_writes_behind_it_until_it_succeeds(df):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "flush failed")
    b = df.barrier(fn)
    df.write(3, blocks(9))
    with pytest.raises(FsError) as e:
        df.wait_for(b)                         # the writer's try and this retry both fail
    assert "flush failed" in e.value.message and not b.done
    assert on_disk(df, 3, 1) == bytes(BS) and df.read(3, 1) == blocks(9)
    df.sync()                                  # the third try succeeds; the write behind it lands
    assert b.done and len(calls) == 3 and on_disk(df, 3, 1) == blocks(9)


def test_a_sync_does_not_wait_for_writes_queued_after_it_began(df):
    real, release = df._apply, {0: threading.Event(), 1: threading.Event()}

    def apply(pblock, data):
        release[pblock].wait(timeout=10)
        real(pblock, data)
    df._apply = apply
    df.write(0, blocks(1))
    syncing = threading.Thread(target=df.sync)
    syncing.start()
    time.sleep(0.05)                           # the sync waits for the first write
    df.write(1, blocks(2))                     # queued after the sync began
    release[0].set()
    syncing.join(timeout=5)
    assert not syncing.is_alive(), "the sync waited for a write queued after it began"
    assert df.unsynced and len(df._queue) == 1
    release[1].set()
    df.sync()
    assert not df.unsynced and on_disk(df, 0, 2) == blocks(1, 2)


def test_writes_fall_back_to_plain_pwrite_where_the_kernel_refuses_rwf_dontcache(df, monkeypatch):
    real, flags_seen = os.pwritev, []

    def pwritev(fd, bufs, pos, flags=0):
        flags_seen.append(flags)
        if flags & datafile.RWF_DONTCACHE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real(fd, bufs, pos, flags)

    monkeypatch.setattr(datafile.os, "pwritev", pwritev)
    df.write(0, blocks(1, 2))
    df.write(5, blocks(3))
    df.sync()
    assert on_disk(df, 0, 2) == blocks(1, 2) and on_disk(df, 5, 1) == blocks(3)
    assert flags_seen == [datafile.RWF_DONTCACHE]          # asked once, then plain writes only
    assert df.stats().dontcache is False


def test_writes_use_rwf_dontcache_where_the_kernel_has_it_and_read_back_intact(df):
    probe = os.open(df.path, os.O_RDWR)
    try:
        os.pwritev(probe, [bytes(BS)], 63 * BS, datafile.RWF_DONTCACHE)
        supported = True
    except OSError as e:
        supported = e.errno not in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(probe)
    df.write(0, blocks(7, 8, 9))
    df.sync()
    assert on_disk(df, 0, 3) == blocks(7, 8, 9) and df.read(0, 3) == blocks(7, 8, 9)
    assert df.stats().dontcache is supported


def test_segments_map_to_their_own_files_at_the_block_offset(df):
    """Block b of segment s is byte b*4096 of segs/<s>; segment 0 is the data file itself; a segment
    never written reads as zeros and gets no file."""
    s1, s7 = datafile.seg_base(1), datafile.seg_base(7)
    df.write(3, blocks(1))
    df.write(s1 + 5, blocks(2, 3))
    df.write(s7, blocks(4))
    assert df.read(s1 + 5, 2) == blocks(2, 3)          # from the queue or the file, the same bytes
    df.sync()
    folder = os.path.join(os.path.dirname(df.path), "segs")
    assert sorted(os.listdir(folder)) == ["1", "7"]
    with open(os.path.join(folder, "1"), "rb") as f:
        assert f.read() == bytes(5 * BS) + blocks(2, 3)
    with open(os.path.join(folder, "7"), "rb") as f:
        assert f.read() == blocks(4)
    assert on_disk(df, 3, 1) == blocks(1)
    assert df.read(s1 + 5, 2) == blocks(2, 3) and df.read(s7, 1) == blocks(4) and df.read(3, 1) == blocks(1)
    assert df.read(datafile.seg_base(9), 2) == bytes(2 * BS)
    assert not os.path.exists(os.path.join(folder, "9"))
    assert datafile.locate(s7 + 2) == (7, 2 * BS)


def test_open_segments_stay_bounded_and_sync_reaches_the_closed_ones(df, monkeypatch):
    """However many segments are written, at most MAX_OPEN_SEGS stay open; a sync makes durable the
    segments closed since they were written too (it reopens them)."""
    monkeypatch.setattr(datafile, "MAX_OPEN_SEGS", 3)
    monkeypatch.setattr(datafile, "SYNCFS_FROM", 100)    # one fdatasync per segment, not one syncfs
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    for s in range(1, 21):
        df.write(datafile.seg_base(s) + s, blocks(s))
    df.sync()
    assert df.open_segments() <= 3
    folder = os.path.join(os.path.dirname(df.path), "segs")
    inodes = {os.stat(os.path.join(folder, str(s))).st_ino for s in range(1, 21)}
    assert inodes <= set(synced)
    for s in range(1, 21):
        assert df.read(datafile.seg_base(s) + s, 1) == blocks(s)
        assert df.open_segments() <= 3
    synced.clear()
    df.sync()                                  # nothing written since: no segment needs it again
    assert not inodes & set(synced)


def test_many_segments_to_sync_take_one_syncfs(df, monkeypatch):
    """Past SYNCFS_FROM segments written since the last sync, one syncfs(2) of the store's filesystem
    replaces their fdatasyncs (a tree of many small files, each in its own segment)."""
    calls: list[str] = []
    real_fdatasync, real_syncfs = os.fdatasync, datafile.syncfs
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
    monkeypatch.setattr(datafile, "syncfs", lambda fd: (calls.append("syncfs"), real_syncfs(fd))[1])
    for s in range(1, datafile.SYNCFS_FROM + 2):
        df.write(datafile.seg_base(s), blocks(s))
    df.sync()
    assert calls.count("syncfs") == 1 and calls.count("fdatasync") == 1     # segment 0's
    calls.clear()
    df.write(datafile.seg_base(1), blocks(9))
    df.sync()
    assert calls == ["fdatasync", "fdatasync"]
