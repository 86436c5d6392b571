"""The data-file layer: the only code that reads or writes file data in the store.

Physical block p lives at byte p * BLOCK_SIZE of one data file. Keeping the mapping "physical block ->
(backing file, byte offset)" here alone means the store could later be split over several backing files
without touching extent maps, refcounts or the cache.

Counters (`stats()`) record every byte read and written, so tests can prove that a clone moved no data.

Page cache: the daemon keeps its own cache of the store's blocks, so the kernel's page cache must not
hold a second copy. Reads use O_DIRECT where the backing filesystem allows it (page-aligned buffers from
an anonymous mmap); where it refuses (tmpfs), pages are dropped with POSIX_FADV_DONTNEED after each read.
Writes are buffered, so a small write costs a memory copy instead of a device round trip. Where the
kernel offers it (Linux 6.14 and later, on filesystems that support it), writes are made with
RWF_DONTCACHE: each one starts its own writeback and its pages leave the page cache once written, which
also costs the writer less CPU than letting dirty pages pile up. Otherwise their pages are let go in two
steps: every DROP_EVERY bytes written, at every sync, and before a read of blocks written since,
POSIX_FADV_DONTNEED starts their writeback (and drops what is already clean); the read of such
"settling" blocks uses O_DIRECT, which waits for their writeback, and then drops them. The last two
steps stay with RWF_DONTCACHE too (they cost little, and then find little to do).

The last block written is remembered (`last_block`): a write that ends inside a block is very often
followed by one that starts in that block (the kernel splits a direct_io write wherever the caller's
buffer crosses a page), and merging with it then needs no read at all.

Writes leave the event loop: `write()` queues the caller's buffer (which must not change afterwards) and
returns; one writer thread copies the queue into the data file in order. Until a queued write is in
the file, `read()` lays it over what the file holds, so every read sees every write. `sync()` waits for
the writes queued before it began and then fdatasyncs; it may run in another thread while the loop goes
on queueing (`unsynced` says whether a completed sync covers every write). The queue is bounded: past BACKLOG bytes,
`room()` is False and callers should wait (`wait_room`), and past twice that `write()` itself waits.
A failed write stops the writer with the failed buffer still at the head of the queue (reads still see
it); the next `sync()` or `wait_for()` retries it in order and raises the error if it fails again, so
nothing queued after it can be overtaken. The data file also grows ahead of need in the writer (`ensure_size`), so the loop
only waits for an fallocate when the writer has fallen a whole step behind.
"""
from __future__ import annotations

import collections
import errno
import mmap
import os
import threading
from dataclasses import dataclass

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE
from .intervals import IntervalSet

DROP_EVERY = 32 << 20
RWF_DONTCACHE = getattr(os, "RWF_DONTCACHE", 0x80)   # linux/fs.h; Python 3.11's os does not name it
GROW_STEP = 16 << 20                # the least the data file grows by; it grows by 1/8 of its size if more
BACKLOG = 64 << 20                  # bytes queued for the writer before room() turns False


@dataclass
class DataFileStats:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    syncs: int = 0
    last_block_hits: int = 0
    direct_io: bool = False
    dontcache: bool = False         # writes use RWF_DONTCACHE (as far as the writes so far tell)


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
        self._buf = AlignedBuffer()        # the loop's, for O_DIRECT reads
        self._last: tuple[int, bytes] | None = None   # (pblock, contents) of the last block written
        # shared with the writer thread, under _cond:
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()   # (pblock, data) or (None, Barrier), oldest
                                                               # first; the head is in flight
        self._backlog = 0                  # bytes in _queue
        self._cover = IntervalSet()        # covers every queued block (exactly, whenever the queue empties)
        self._error: OSError | None = None  # the head failed: the writer waits for a retry
        self._seq = 0                      # writes queued so far
        self._written = 0                  # writes in the file so far (in queue order)
        self._durable = 0                  # writes that a completed sync made durable
        self._recent = IntervalSet()      # blocks written since the last drop: dirty in the page cache
        self._settling = IntervalSet()    # blocks whose writeback the last drop started
        self._since_drop = 0
        self._dontcache = True             # writes use RWF_DONTCACHE until the kernel refuses it
        self._grow_to = 0                  # bytes the writer should grow the file to, 0: none asked
        self._stop = False
        self._grow_lock = threading.Lock()  # one fallocate at a time; _size changes under it
        self._size = os.fstat(self._fd).st_size
        self._writer = threading.Thread(target=self._run, name="reflinkfs-data-writer", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Stop the writer and close the file. What is still queued is dropped: call sync() first."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._writer.is_alive() and self._writer is not threading.current_thread():
            self._writer.join()
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1
        self._buf.close()

    def stats(self) -> DataFileStats:
        return DataFileStats(**{**vars(self._stats), "dontcache": self._dontcache})

    def size_blocks(self) -> int:
        return os.fstat(self._fd).st_size // BLOCK_SIZE

    def read(self, pblock: int, nblocks: int, buf: "AlignedBuffer | None" = None):
        """Read nblocks blocks; blocks past the end of the file read as zeros. Another thread than the
        loop's may read too, with a buffer of its own (`buf`); the result is then a view into that
        buffer, valid until its next read (the caller copies what it keeps), else `bytes`."""
        nbytes = nblocks * BLOCK_SIZE
        pos = pblock * BLOCK_SIZE
        end = pblock + nblocks
        if buf is None and nblocks == 1 and self._last is not None and self._last[0] == pblock:
            self._stats.last_block_hits += 1
            return self._last[1]
        with self._cond:       # taken before the file is read: what leaves the queue later is in the file
            queued = self._queued(pblock, end)
            recent = _overlaps(self._recent, pblock, end)
        if recent:
            self._drop_pages()            # start their writeback; the O_DIRECT read below waits for it
        try:
            if self._dfd >= 0:
                mem = (buf or self._buf).get(nbytes)
                got = os.preadv(self._dfd, [memoryview(mem)[:nbytes]], pos)
                if buf is not None:           # no copy: the caller copies each unit out of it
                    mem[got:nbytes] = bytes(nbytes - got)
                    data = memoryview(mem)[:nbytes]
                else:
                    data = mem[:got]
                with self._cond:
                    settled = _overlaps(self._settling, pblock, end)
                    if settled:
                        self._settling.remove(pblock, end)
                if settled:
                    os.posix_fadvise(self._fd, pos, nbytes, os.POSIX_FADV_DONTNEED)   # now clean: drop
            else:
                data = os.pread(self._fd, nbytes, pos)
                os.posix_fadvise(self._fd, pos, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"data file read failed at block {pblock}: {e.strerror}")
        with self._cond:                  # the loader thread counts too
            self._stats.reads += 1
            self._stats.bytes_read += got if self._dfd >= 0 else len(data)
        if len(data) < nbytes:
            data = data + bytes(nbytes - len(data))
        if queued:
            out = bytearray(data)
            for qb, qdata in queued:          # oldest first, so the newest write of a block wins
                s, e = max(qb, pblock), min(qb + len(qdata) // BLOCK_SIZE, end)
                out[(s - pblock) * BLOCK_SIZE:(e - pblock) * BLOCK_SIZE] = \
                    memoryview(qdata)[(s - qb) * BLOCK_SIZE:(e - qb) * BLOCK_SIZE]
            data = bytes(out)
        return data

    def _queued(self, start: int, end: int) -> list:
        """The queued writes that overlap blocks [start, end), oldest first. Under _cond."""
        if not self._queue or not _overlaps(self._cover, start, end):
            return []
        found = [(qb, d) for qb, d in self._queue
                 if qb is not None and qb < end and qb + len(d) // BLOCK_SIZE > start]
        if not found:                         # the cover had grown stale: make it exact again
            self._cover.clear()
            for qb, d in self._queue:
                if qb is not None:
                    self._cover.add(qb, qb + len(d) // BLOCK_SIZE)
        return found

    def write(self, pblock: int, data) -> None:
        """Queue whole blocks for writing at pblock (`data` length a multiple of BLOCK_SIZE). The caller
        must not change `data` afterwards. Errors surface at sync() or wait_for()."""
        nbytes = len(data)
        assert nbytes % BLOCK_SIZE == 0, nbytes
        end = pblock + nbytes // BLOCK_SIZE
        with self._cond:
            while self._backlog >= 2 * BACKLOG and self._error is None:
                self._cond.wait()
            if self._error is not None and self._backlog >= 2 * BACKLOG:
                self._drain_locked()            # the writer is stuck on an error: retry it here, or fail
            self._queue.append((pblock, data))
            self._backlog += nbytes
            self._cover.add(pblock, end)
            self._recent.add(pblock, end)
            self._seq += 1
            self._cond.notify_all()
        self._last = (end - 1, bytes(memoryview(data)[nbytes - BLOCK_SIZE:]))
        self._stats.writes += 1
        self._stats.bytes_written += nbytes

    def barrier(self, fn) -> "Barrier":
        """Queue fn() to run in the writer after every write queued so far and before every later one.
        Wait for it with wait_for()."""
        b = Barrier(fn)
        with self._cond:
            self._queue.append((None, b))
            self._cond.notify_all()
        return b

    def wait_for(self, barrier: "Barrier") -> None:
        """Wait until barrier has run. Raises FsError if it, or a write before it, keeps failing."""
        with self._cond:
            self._drain_locked(lambda: barrier.done)

    def room(self) -> bool:
        """Whether the queue has room, so that a write now does not wait for the writer."""
        return self._backlog < BACKLOG or self._error is not None

    def wait_room(self, timeout: float | None = None) -> bool:
        """Wait (in a thread other than the loop's) until room() is True."""
        with self._cond:
            return self._cond.wait_for(self.room, timeout)

    @property
    def unsynced(self) -> bool:
        """Whether anything written is not yet made durable by a completed sync()."""
        return self._durable != self._seq

    def _apply(self, pblock: int | None, data) -> None:
        if pblock is None:
            data.fn()                         # a barrier
            return
        pos = pblock * BLOCK_SIZE
        done = -1
        if self._dontcache:
            try:
                done = os.pwritev(self._fd, [data], pos, RWF_DONTCACHE)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dontcache = False       # an older kernel, or a filesystem without it
        if done < 0:
            done = os.pwrite(self._fd, data, pos)
        if done != len(data):
            raise OSError(errno.ENOSPC, f"short write to the data file at block {pblock}")

    def _run(self) -> None:
        """The writer thread: the queue, head first, into the file; growth when asked."""
        while True:
            with self._cond:
                while not self._stop and (self._error is not None or not (self._queue or self._grow_to)):
                    self._cond.wait()
                if self._stop:
                    return
                grow, self._grow_to = self._grow_to, 0
                head = self._queue[0] if self._queue else None
            if grow:
                try:
                    self._grow(grow)
                except OSError:
                    pass                      # the loop grows it itself when it must, and reports why not
            if head is None:
                continue
            try:
                self._apply(*head)
            except Exception as e:          # the writer must not die: stop here, a sync retries
                if not isinstance(e, OSError):
                    e = OSError(errno.EIO, f"internal error in the data file's writer: {e!r}")
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                continue
            with self._cond:
                self._done_head()
                drop = self._since_drop >= DROP_EVERY
            if drop:
                self._drop_pages()

    def _done_head(self) -> None:
        """The head of the queue is in the file. Under _cond."""
        pblock, data = self._queue.popleft()
        if pblock is None:
            data.done = True
        else:
            self._written += 1
            self._backlog -= len(data)
            if not self._dontcache:
                self._since_drop += len(data)
        if not self._queue:
            self._cover.clear()
        self._cond.notify_all()

    def _drain_locked(self, done=None) -> None:
        """Wait until done() (default: the queue is empty), retrying a failed head here, in order. Raises
        FsError for a head that fails again; what was queued after it stays queued. Under _cond."""
        while not (done() if done else not self._queue):
            if self._error is not None:
                pblock = self._queue[0][0]
                try:
                    self._apply(*self._queue[0])
                except OSError as e:
                    self._error = e
                    what = "a sync after a commit" if pblock is None else f"data file write at block {pblock}"
                    raise FsError(e.errno or errno.EIO, f"{what} failed: {e.strerror}") from None
                self._error = None
                self._done_head()
            else:
                self._cond.wait()

    def _drop_pages(self) -> None:
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with self._cond:
            self._since_drop = 0
            self._settling = self._recent
            self._recent = IntervalSet()

    def sync(self) -> None:
        """Make everything written so far durable. May run in a thread other than the loop's."""
        with self._cond:                  # what is queued meanwhile is for the next sync
            mark = self._seq
            self._drain_locked(lambda: self._written >= mark)
        os.fdatasync(self._fd)
        with self._cond:
            self._durable = max(self._durable, mark)
        self._stats.syncs += 1
        self._drop_pages()
        with self._cond:
            self._settling.clear()       # synced, so the drop just made freed them all
        self._last = None            # from here on the file itself is the only truth

    def _step(self) -> int:
        return max(GROW_STEP, self._size // 8 // BLOCK_SIZE * BLOCK_SIZE)

    def ensure_size(self, nblocks: int) -> None:
        """Grow the file to hold nblocks blocks, reserving the space (fallocate), so that a buffered
        write can never fail later, at writeback, for want of space. Grows by at least GROW_STEP; once
        the need comes within half a step of the end, the writer grows it by another step."""
        want = nblocks * BLOCK_SIZE
        if want <= self._size:
            if want > self._size - self._step() // 2 and not self._grow_to:
                with self._cond:
                    self._grow_to = self._size + self._step()
                    self._cond.notify_all()
            return
        with self._grow_lock:
            have = self._size = os.fstat(self._fd).st_size
            if have >= want:
                return
            for target in (max(want, have + self._step()), want):
                try:
                    self._grow_locked(have, target)
                    return
                except OSError as e:
                    if e.errno == errno.ENOSPC and target != want:
                        continue
                    raise FsError(e.errno or errno.EIO, "no space left for the store's data file"
                                  if e.errno == errno.ENOSPC else f"cannot grow the data file: {e.strerror}")

    def _grow(self, target: int) -> None:
        with self._grow_lock:
            have = self._size = os.fstat(self._fd).st_size
            if have < target:
                self._grow_locked(have, target)

    def _grow_locked(self, have: int, target: int) -> None:
        try:
            os.posix_fallocate(self._fd, have, target - have)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, target)   # no fallocate here: grow sparsely
        self._size = target


class Barrier:
    """A call queued among the writes (see DataFile.barrier)."""
    __slots__ = ("fn", "done")

    def __init__(self, fn):
        self.fn = fn
        self.done = False


def _overlaps(intervals: IntervalSet, start: int, end: int) -> bool:
    return any(inside for _, _, inside in intervals.pieces(start, end))


class AlignedBuffer:
    """A page-aligned buffer for O_DIRECT reads: the loop's own, and one per other thread that reads."""

    def __init__(self):
        self._mem: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if self._mem is None or len(self._mem) < nbytes:
            self.close()
            self._mem = mmap.mmap(-1, max(nbytes, 1 << 20))
        return self._mem

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None
