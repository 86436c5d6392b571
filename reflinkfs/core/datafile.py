"""The data-file layer: the only code that reads or writes file data in the store.

Physical block p lives at byte p * BLOCK_SIZE of one data file. Keeping the mapping "physical block ->
(backing file, byte offset)" here alone means the store could later be split over several backing files
without touching extent maps, refcounts or the cache.

Counters (`stats()`) record every byte read and written, so tests can prove that a clone moved no data.

Page cache: the daemon keeps its own cache of the store's blocks, so the kernel's page cache must not
hold a second copy. Reads use O_DIRECT where the backing filesystem allows it (page-aligned buffers from
an anonymous mmap); where it refuses (tmpfs), pages are dropped with POSIX_FADV_DONTNEED after each read.
Writes are buffered, so a small write costs a memory copy instead of a device round trip. Their pages
are let go in two steps: every DROP_EVERY bytes written, at every sync, and before a read of blocks
written since, POSIX_FADV_DONTNEED starts their writeback (and drops what is already clean); the read of
such "settling" blocks uses O_DIRECT, which waits for their writeback, and then drops them.

The last block written is remembered (`last_block`): a write that ends inside a block is very often
followed by one that starts in that block (the kernel splits a direct_io write wherever the caller's
buffer crosses a page), and merging with it then needs no read at all.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE
from .intervals import IntervalSet

DROP_EVERY = 32 << 20
GROW_STEP = 16 << 20


@dataclass
class DataFileStats:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    syncs: int = 0
    last_block_hits: int = 0
    direct_io: bool = False


class DataFile:
    def __init__(self, path: str, direct: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._dfd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._dfd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:
                self._dfd = -1
        self._stats = DataFileStats(direct_io=self._dfd >= 0)
        self._buf: mmap.mmap | None = None
        self._recent = IntervalSet()      # blocks written since the last drop: dirty in the page cache
        self._settling = IntervalSet()    # blocks whose writeback the last drop started
        self._last: tuple[int, bytes] | None = None   # (pblock, contents) of the last block written
        self._since_drop = 0

    def close(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1
        if self._buf is not None:
            self._buf.close()
            self._buf = None

    def stats(self) -> DataFileStats:
        return DataFileStats(**vars(self._stats))

    def size_blocks(self) -> int:
        return os.fstat(self._fd).st_size // BLOCK_SIZE

    def _aligned(self, nbytes: int) -> mmap.mmap:
        if self._buf is None or len(self._buf) < nbytes:
            if self._buf is not None:
                self._buf.close()
            self._buf = mmap.mmap(-1, max(nbytes, 1 << 20))
        return self._buf

    def read(self, pblock: int, nblocks: int) -> bytes:
        """Read nblocks blocks; blocks past the end of the file read as zeros."""
        nbytes = nblocks * BLOCK_SIZE
        pos = pblock * BLOCK_SIZE
        end = pblock + nblocks
        if nblocks == 1 and self._last is not None and self._last[0] == pblock:
            self._stats.last_block_hits += 1
            return self._last[1]
        if _overlaps(self._recent, pblock, end):
            self._drop_pages()            # start their writeback; the O_DIRECT read below waits for it
        try:
            if self._dfd >= 0:
                buf = self._aligned(nbytes)
                got = os.preadv(self._dfd, [memoryview(buf)[:nbytes]], pos)
                data = buf[:got]
                if _overlaps(self._settling, pblock, end):
                    os.posix_fadvise(self._fd, pos, nbytes, os.POSIX_FADV_DONTNEED)   # now clean: drop
                    self._settling.remove(pblock, end)
            else:
                data = os.pread(self._fd, nbytes, pos)
                os.posix_fadvise(self._fd, pos, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"data file read failed at block {pblock}: {e.strerror}")
        self._stats.reads += 1
        self._stats.bytes_read += len(data)
        if len(data) < nbytes:
            data = data + bytes(nbytes - len(data))
        return data

    def write(self, pblock: int, data) -> None:
        """Write whole blocks at pblock. `data` length must be a multiple of BLOCK_SIZE."""
        nbytes = len(data)
        assert nbytes % BLOCK_SIZE == 0, nbytes
        pos = pblock * BLOCK_SIZE
        try:
            done = os.pwrite(self._fd, data, pos)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"data file write failed at block {pblock}: {e.strerror}")
        if done != nbytes:
            raise FsError(errno.ENOSPC, f"short write to the data file at block {pblock}")
        last = pblock + nbytes // BLOCK_SIZE - 1
        self._last = (last, bytes(memoryview(data)[nbytes - BLOCK_SIZE:]))
        self._recent.add(pblock, last + 1)
        self._since_drop += nbytes
        if self._since_drop >= DROP_EVERY:
            self._drop_pages()
        self._stats.writes += 1
        self._stats.bytes_written += nbytes

    def _drop_pages(self) -> None:
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._since_drop = 0
        self._settling = self._recent
        self._recent = IntervalSet()

    def sync(self) -> None:
        os.fdatasync(self._fd)
        self._stats.syncs += 1
        self._drop_pages()
        self._settling.clear()       # synced, so the drop just made freed them all
        self._last = None            # from here on the file itself is the only truth

    def ensure_size(self, nblocks: int) -> None:
        """Grow the file to hold nblocks blocks, reserving the space (fallocate), so that a buffered
        write can never fail later, at writeback, for want of space. Grows by at least GROW_STEP."""
        have = os.fstat(self._fd).st_size
        want = nblocks * BLOCK_SIZE
        if have >= want:
            return
        for target in (max(want, have + GROW_STEP), want):
            try:
                os.posix_fallocate(self._fd, have, target - have)
                return
            except OSError as e:
                if e.errno == errno.ENOSPC and target != want:
                    continue
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    os.ftruncate(self._fd, want)   # no fallocate here: grow sparsely
                    return
                raise FsError(e.errno or errno.EIO, "no space left for the store's data file"
                              if e.errno == errno.ENOSPC else f"cannot grow the data file: {e.strerror}")


def _overlaps(intervals: IntervalSet, start: int, end: int) -> bool:
    return any(inside for _, _, inside in intervals.pieces(start, end))
