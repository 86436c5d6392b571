"""The data-file layer: the only code that reads or writes file data in the store.

Physical block p lives at byte p * BLOCK_SIZE of one data file. Keeping the mapping "physical block ->
(backing file, byte offset)" here alone means the store could later be split over several backing files
without touching extent maps, refcounts or the cache.

Counters (`stats()`) record every byte read and written, so tests can prove that a clone moved no data.

Page cache: the daemon keeps its own cache of the store's blocks, so the kernel's page cache must not
hold a second copy. The file is opened with O_DIRECT where the backing filesystem allows it (reads and
writes then use page-aligned buffers from an anonymous mmap); where it refuses (tmpfs), pages are dropped
with POSIX_FADV_DONTNEED after each read and after each sync.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE


@dataclass
class DataFileStats:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    syncs: int = 0
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
        try:
            if self._dfd >= 0:
                buf = self._aligned(nbytes)
                got = os.preadv(self._dfd, [memoryview(buf)[:nbytes]], pos)
                data = buf[:got]
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
            if self._dfd >= 0:
                buf = self._aligned(nbytes)
                buf[:nbytes] = data
                done = os.pwritev(self._dfd, [memoryview(buf)[:nbytes]], pos)
            else:
                done = os.pwrite(self._fd, data, pos)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"data file write failed at block {pblock}: {e.strerror}")
        if done != nbytes:
            raise FsError(errno.ENOSPC, f"short write to the data file at block {pblock}")
        self._stats.writes += 1
        self._stats.bytes_written += nbytes

    def sync(self) -> None:
        os.fdatasync(self._fd)
        self._stats.syncs += 1
        if self._dfd < 0:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def ensure_size(self, nblocks: int) -> None:
        """Grow the file (sparsely) to hold nblocks blocks."""
        if os.fstat(self._fd).st_size < nblocks * BLOCK_SIZE:
            os.ftruncate(self._fd, nblocks * BLOCK_SIZE)
