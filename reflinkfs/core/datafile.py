"""The data-file layer: the only code that reads or writes file data in the store.

Segments. A physical block number is one integer, the segment number in the bits from SEG_SHIFT up and
the block within the segment below them: block b of segment s is physical block (s << SEG_SHIFT) | b,
stored at byte b * BLOCK_SIZE of that segment's file. Segment 0 is the store's data file (`data`), so
every physical block of a version 2 store keeps its meaning; segment s > 0 is the sparse file
`segs/<s>` next to it (see `segment_path`). This module alone knows that mapping (`locate`): extent
maps, refcounts, checksums and the shared cache see one integer address space, as before. SEG_SHIFT is
35 while a file holds at most 2**34 blocks (64 TiB), so a segment used at identity offsets never fills
its address range, and two segments' runs can never touch (no run, free or used, is merged across a
segment boundary). Units of the cache are aligned inside a segment for the same reason.

Open descriptors are bounded however many segments exist: segment 0 stays open; the others are opened
on demand and kept in a small LRU (MAX_OPEN_SEGS). A descriptor in use by a thread is pinned and never
closed under it; a segment evicted with writes not yet made durable is fdatasynced before it is closed,
so that `sync()` need only fdatasync the segments still open and written since the last one.

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
steps stay with RWF_DONTCACHE too (they cost little, and then find little to do). Of segment 0 the drops
cover the whole file; of other segments only the blocks written: the rest of a segment's page cache is
the kernel's one copy of the whole files it reads from that segment itself (FUSE passthrough), which a
drop would make every clone read from the disk again.

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
import logging
import mmap
import os
import threading
from dataclasses import dataclass

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE, SEGS_NAME
from .intervals import IntervalSet

log = logging.getLogger("reflinkfs.datafile")
DROP_EVERY = 32 << 20
RWF_DONTCACHE = getattr(os, "RWF_DONTCACHE", 0x80)   # linux/fs.h; Python 3.11's os does not name it
GROW_STEP = 16 << 20                # the least the data file grows by; it grows by 1/8 of its size if more
BACKLOG = 64 << 20                  # bytes queued for the writer before room() turns False
SEG_SHIFT = 35                      # physical block = segment << SEG_SHIFT | block within the segment
SEG_BLOCKS = 1 << SEG_SHIFT
SYNCFS_FROM = 16                    # more segments than this to sync: one syncfs(2) instead
MAX_OPEN_SEGS = 64                  # descriptors kept open for segments other than 0 (unless in use)


def locate(pblock: int) -> tuple[int, int]:
    """(segment, byte offset in the segment's file) of physical block pblock."""
    return pblock >> SEG_SHIFT, (pblock & (SEG_BLOCKS - 1)) * BLOCK_SIZE


def seg_base(seg: int) -> int:
    """The physical block number of block 0 of segment seg."""
    return seg << SEG_SHIFT


def segment_path(data_path: str, seg: int) -> str:
    """The file of segment seg, for the store whose data file (segment 0) is data_path."""
    if seg == 0:
        return data_path
    return os.path.join(os.path.dirname(data_path), SEGS_NAME, str(seg))


def file_layout(fd: int) -> tuple[int, list[tuple[int, int]]]:
    """(size in bytes, [(first block, end block)] of the ranges that hold data) of an open file, from
    SEEK_DATA/SEEK_HOLE, widened to whole blocks. Where the filesystem cannot tell, all of it is data."""
    size = os.fstat(fd).st_size
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:       # only a hole from pos to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start // BLOCK_SIZE, -(-end // BLOCK_SIZE)))
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        ranges = [(0, -(-size // BLOCK_SIZE))] if size else []
    return size, ranges


class _Seg:
    """An open segment file. `pins`: threads using its descriptors now (under DataFile._seg_lock)."""
    __slots__ = ("seg", "fd", "dfd", "pins")

    def __init__(self, seg: int, fd: int, dfd: int):
        self.seg, self.fd, self.dfd, self.pins = seg, fd, dfd, 0


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
    """Threads: the loop reads, writes (queues) and asks for growth; the writer thread applies the queue and
    grows segment 0; a worker thread runs sync(); the cache's loader threads read with buffers of their own.
    Owners: `_last` and `_buf` belong to the loop (read() with buf=None, write()); the queue, `_cover`,
    `_recent`, `_settling`, `_dirty` and the counters other than the loop's are under `_cond`; the open
    segments (`_segs`, `_Seg.pins`) under `_seg_lock`; `_size` under `_grow_lock`."""

    def __init__(self, path: str, direct: bool = True):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._dfd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._dfd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:
                self._dfd = -1
        self._seg0 = _Seg(0, self._fd, self._dfd)   # open for the DataFile's whole life
        self._direct = direct
        self._seg_lock = threading.Lock()
        self._segs: collections.OrderedDict[int, _Seg] = collections.OrderedDict()   # LRU, oldest first
        self._dirty: set[int] = set()      # segments > 0 written since the last sync (under _cond)
        self._new_files = False            # a segment file was created since the last sync (under _cond)
        self._seg_size: dict[int, int] = {}   # the loop's: size of a segment's file once the queue is applied
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
        with self._seg_lock:
            for h in self._segs.values():
                _close_seg(h)
            self._segs.clear()
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1
        self._buf.close()

    def stats(self) -> DataFileStats:
        return DataFileStats(**{**vars(self._stats), "dontcache": self._dontcache})

    def open_segments(self) -> int:
        """How many segment files other than segment 0 are open now."""
        with self._seg_lock:
            return len(self._segs)

    def _pin(self, seg: int, create: bool) -> "_Seg | None":
        """The open segment seg, pinned (release with _unpin); None if its file does not exist and
        `create` is False. Opening one may close the least recently used unpinned others."""
        if seg == 0:
            return self._seg0
        with self._seg_lock:
            h = self._segs.get(seg)
            if h is None:
                path = segment_path(self.path, seg)
                flags = os.O_RDWR | os.O_CLOEXEC
                try:
                    fd = os.open(path, flags)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
                    fd = os.open(path, flags | os.O_CREAT, 0o600)
                    with self._cond:          # its directory entry is made durable by the next sync
                        self._new_files = True
                dfd = -1
                if self._dfd >= 0:
                    try:
                        dfd = os.open(path, flags | os.O_DIRECT)
                    except OSError:
                        dfd = -1
                h = self._segs[seg] = _Seg(seg, fd, dfd)
                for old in [o for o in self._segs.values() if o.pins == 0 and o is not h]:
                    if len(self._segs) <= MAX_OPEN_SEGS:
                        break
                    del self._segs[old.seg]
                    _close_seg(old)      # its unsynced writes stay in _dirty: sync() reopens it
            self._segs.move_to_end(seg)
            h.pins += 1
            return h

    def segment_layout(self, seg: int) -> tuple[int, list[tuple[int, int]]] | None:
        """file_layout() of segment seg's file (block numbers within the segment) as it is on disk now,
        without the writes still queued; None if the segment has no file."""
        h = self._pin(seg, create=False)
        try:
            return None if h is None else file_layout(h.fd)
        finally:
            self._unpin(h)

    def _expected_size(self, seg: int) -> int:
        """The size segment seg's file will have once the queue is applied. The loop's."""
        size = self._seg_size.get(seg)
        if size is None:
            try:
                size = os.stat(segment_path(self.path, seg)).st_size
            except FileNotFoundError:
                size = 0
            self._seg_size[seg] = size
        return size

    def resize(self, seg: int, nbytes: int, queue: bool = True) -> bool:
        """Queue: make segment seg's file nbytes long, after every write queued so far; nothing is queued
        when those writes leave it that long. Returns whether a change is needed; with queue=False the
        caller queues set_size(seg, nbytes) itself, before any later write. The loop's."""
        if self._expected_size(seg) == nbytes:
            return False
        self._seg_size[seg] = nbytes
        if queue:
            self.barrier(lambda: self.set_size(seg, nbytes))
        return True

    def created(self, seg: int) -> None:
        """Segment seg is new: its file does not exist yet (the writer makes it). The loop's."""
        self._seg_size[seg] = 0

    def forget(self, seg: int) -> None:
        """Segment seg is gone (its file is deleted by a queued release). The loop's."""
        self._seg_size.pop(seg, None)

    def set_size(self, seg: int, nbytes: int, create: bool = True) -> None:
        """Make segment seg's file nbytes long now (resize() queues it instead)."""
        h = self._pin(seg, create=create)
        try:
            if h is not None and os.fstat(h.fd).st_size != nbytes:
                os.ftruncate(h.fd, nbytes)
                with self._cond:
                    self._dirty.add(seg)
        finally:
            self._unpin(h)

    def release(self, punch, gone) -> None:
        """Punch the blocks of `punch` ((pblock, nblocks) runs outside segment 0) out of their segment files
        and delete the files of the segments in `gone`. Only for blocks and segments that a durable commit
        has released (the volume queues this behind that commit's sync); what is written to them later is
        queued after it. Failures are logged, never raised: the blocks are free in the metadata either way,
        fsck reports what is left, and the next open (segments.recover) tries again. A filesystem that
        cannot punch holes leaves the bytes."""
        for pblock, nblocks in punch:
            seg, pos = locate(pblock)
            if seg == 0 or seg in gone:
                continue
            h = None
            try:
                h = self._pin(seg, create=False)
                if h is not None:
                    punch_hole(h.fd, pos, nblocks * BLOCK_SIZE)
            except OSError as e:
                log.warning("cannot punch blocks %d+%d out of segment %d: %s", pblock, nblocks, seg, e)
            finally:
                self._unpin(h)
        for seg in gone:
            with self._seg_lock:
                h = self._segs.get(seg)
                if h is not None and h.pins == 0:     # a pinned one is closed by a later eviction
                    del self._segs[seg]
                    _close_seg(h)
            with self._cond:
                self._dirty.discard(seg)
            try:
                os.unlink(segment_path(self.path, seg))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot delete the file of removed segment %d: %s", seg, e)

    def _unpin(self, h: "_Seg | None") -> None:
        if h is None or h.seg == 0:
            return
        with self._seg_lock:
            h.pins -= 1

    def size_blocks(self) -> int:
        """The size of segment 0 (the store's data file) in blocks."""
        return os.fstat(self._fd).st_size // BLOCK_SIZE

    def read(self, pblock: int, nblocks: int, buf: "AlignedBuffer | None" = None):
        """Read nblocks blocks; blocks past the end of the file read as zeros. Another thread than the
        loop's may read too, with a buffer of its own (`buf`); the result is then a view into that
        buffer, valid until its next read (the caller copies what it keeps), else `bytes`."""
        nbytes = nblocks * BLOCK_SIZE
        seg, pos = locate(pblock)         # a read never crosses a segment: no run or cache unit does
        end = pblock + nblocks
        if buf is None and nblocks == 1 and self._last is not None and self._last[0] == pblock:
            self._stats.last_block_hits += 1
            return self._last[1]
        with self._cond:       # taken before the file is read: what leaves the queue later is in the file
            queued = self._queued(pblock, end)
            recent = _overlaps(self._recent, pblock, end)
        if recent:
            self._drop_pages()            # start their writeback; the O_DIRECT read below waits for it
        h = None
        data: bytes | memoryview
        try:
            h = self._pin(seg, create=False)
            if h is None:                 # a segment never written (or removed) reads as zeros
                got = 0
                data = memoryview(bytes(nbytes)) if buf is not None else b""
            elif h.dfd >= 0:
                mem = (buf or self._buf).get(nbytes)
                got = os.preadv(h.dfd, [memoryview(mem)[:nbytes]], pos)
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
                    os.posix_fadvise(h.fd, pos, nbytes, os.POSIX_FADV_DONTNEED)   # now clean: drop
            else:
                data = os.pread(h.fd, nbytes, pos)
                got = len(data)
                os.posix_fadvise(h.fd, pos, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"data file read failed at block {pblock}: {e.strerror}")
        finally:
            self._unpin(h)
        with self._cond:                  # the loader thread counts too
            self._stats.reads += 1
            self._stats.bytes_read += got
        if len(data) < nbytes:
            data = bytes(data) + bytes(nbytes - len(data))
        if queued:
            out = bytearray(data)
            for qb, qdata in queued:          # oldest first, so the newest write of a block wins
                s, t = max(qb, pblock), min(qb + len(qdata) // BLOCK_SIZE, end)
                out[(s - pblock) * BLOCK_SIZE:(t - pblock) * BLOCK_SIZE] = \
                    memoryview(qdata)[(s - qb) * BLOCK_SIZE:(t - qb) * BLOCK_SIZE]
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

    def queued_in(self, seg: int) -> bool:
        """Whether writes to segment seg are still queued, not yet in its file (where a reader of the file
        itself, not through read(), would miss them)."""
        base = seg_base(seg)
        with self._cond:
            return bool(self._queued(base, base + SEG_BLOCKS))

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
        seg = pblock >> SEG_SHIFT
        if seg:
            seg_end = (end - (seg << SEG_SHIFT)) * BLOCK_SIZE
            if seg_end > self._expected_size(seg):
                self._seg_size[seg] = seg_end
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
        seg, pos = locate(pblock)
        h = self._pin(seg, create=True)
        assert h is not None              # create=True: the segment is made if it was missing
        try:
            done = -1
            if self._dontcache:
                try:
                    done = os.pwritev(h.fd, [data], pos, RWF_DONTCACHE)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._dontcache = False       # an older kernel, or a filesystem without it
            if done < 0:
                done = os.pwrite(h.fd, data, pos)
        finally:
            self._unpin(h)
        if done != len(data):
            raise OSError(errno.ENOSPC, f"short write to the data file at block {pblock}")
        if seg:
            with self._cond:              # only once the bytes are in the file: see sync()
                self._dirty.add(seg)

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
        """Let go of the pages that writes put in the page cache: all of segment 0's, and of the other
        segments the blocks written since the last drop, never the rest: the page cache of a segment that
        holds whole files is the kernel's one copy of them when it reads them itself (FUSE passthrough)."""
        with self._cond:
            written = list(self._recent)
        os.posix_fadvise(self._seg0.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        by_seg: dict[int, list[tuple[int, int]]] = {}
        for start, end in written:
            seg = start >> SEG_SHIFT
            if seg:                            # runs never cross a segment boundary
                by_seg.setdefault(seg, []).append((start, end))
        for seg, ranges in by_seg.items():
            h = self._pin(seg, create=False)
            if h is None:
                continue
            try:
                for start, end in ranges:
                    os.posix_fadvise(h.fd, locate(start)[1], (end - start) * BLOCK_SIZE, os.POSIX_FADV_DONTNEED)
            finally:
                self._unpin(h)
        with self._cond:
            self._since_drop = 0
            self._settling = self._recent
            self._recent = IntervalSet()

    def sync(self) -> None:
        """Make everything written so far durable. May run in a thread other than the loop's."""
        with self._cond:                  # what is queued meanwhile is for the next sync
            mark = self._seq
            self._drain_locked(lambda: self._written >= mark)
            # every write before mark marked its segment before it counted as written; later writes
            # that land after this mark again, for the next sync
            dirty, self._dirty = self._dirty, set()
            new_files, self._new_files = self._new_files, False
        try:
            os.fdatasync(self._fd)
            if new_files:           # one fsync of the folder for every segment file made since the last sync
                dfd = os.open(os.path.join(os.path.dirname(self.path), SEGS_NAME), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            if len(dirty) > SYNCFS_FROM and syncfs(self._fd):
                dirty = set()       # one syncfs of the store's filesystem instead of many fdatasyncs
            for seg in sorted(dirty):
                h = self._pin(seg, create=False)   # reopened if evicted: fdatasync covers the file
                try:
                    if h is not None:
                        os.fdatasync(h.fd)
                finally:
                    self._unpin(h)
        except BaseException:
            with self._cond:
                self._dirty |= dirty
                self._new_files |= new_files
            raise
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
        """Grow segment 0 (the data file) to hold nblocks blocks, reserving the space (fallocate), so that a buffered
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


_FALLOC_PUNCH = 0x02 | 0x01        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)
_libc = None


def _load_libc():
    global _libc
    import ctypes
    import ctypes.util
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _libc


def syncfs(fd: int) -> bool:
    """syncfs(2) on the filesystem holding fd (Linux 5.8 and later report writeback errors through it);
    False where libc lacks it."""
    import ctypes
    fn = getattr(_load_libc(), "syncfs", None)
    if fn is None:
        return False
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def punch_hole(fd: int, pos: int, nbytes: int) -> bool:
    """Deallocate bytes [pos, pos+nbytes) of a file, keeping its size; False where the filesystem cannot."""
    import ctypes
    if _load_libc().fallocate(fd, _FALLOC_PUNCH, pos, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def _close_seg(h: _Seg) -> None:
    """Close an unpinned segment's descriptors. Under _seg_lock. Its pages stay: those that writes put there
    are let go by the next _drop_pages (which opens it again), the others may be the kernel's (passthrough)."""
    for fd in (h.fd, h.dfd):
        if fd >= 0:
            os.close(fd)
    h.fd = h.dfd = -1


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
