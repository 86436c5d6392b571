"""The block caches: one shared cache keyed by physical offset, and a plain per-inode cache beside it.

Why: the kernel caches pages per inode, so N reflinked copies cost N copies of RAM. Here the cache key is
the physical position of the bytes in the store, so every file that maps a physical range is served the
**same buffer object** for it. `--cache inode` keys the very same machinery by (inode, logical offset) —
the behaviour of a per-inode page cache — so the two can be measured side by side. Only the key differs:
unit size, budget, eviction policy and code path are shared.

Units: the cache holds immutable `bytes` objects of UNIT_BLOCKS blocks (64 KiB), aligned in the key's
address space (physical for `shared`, logical for `inode`). Readers get them whole or as memoryviews into
them. A unit is never changed in place: a write drops the units it covers, so a buffer a reader (or another
file) holds never changes under it, and copy-on-write leaves the shared original untouched by construction.

Coherence: every write of the data file goes through here (`write`), and drops the units it touches; freed
physical blocks drop their units; a change of a file's mapping drops that file's units in `inode` mode.

Integrity: a physical unit may contain blocks of other files or free blocks. When it is loaded, each
block that has a checksum is verified; a block is served only if it verified (a block that failed, or that
has no checksum although a file maps it, raises EIO naming the file and offset).

Eviction (`policy`, by name):
- `2q` (default): new units enter a FIFO probation queue; a re-reference while still there does not
  count (it is the same scan); units evicted from probation leave a ghost key, and a unit loaded again
  while its ghost is remembered goes to the protected LRU. A single huge sequential read therefore only
  cycles through probation and cannot flush the protected hot set.
- `lru`: plain least-recently-used, for comparison.
Eviction work is bounded: each unit inserted evicts at most the units needed to fit it (one or two
units of the same size), and the ghost list is capped.

Budget: fixed (`--cache-size`), or chosen by the mount from the machine's memory and lowered under memory
pressure (core/budget.py). `resize()` sets it and evicts at once what no longer fits, probation first;
the last shrink (when, from, to, why) is in `stats()`. Only the loop's thread calls it, as every method.

Readahead: a read that continues where the previous read of the same file ended, and has to go to the
data file, loads up to `readahead` bytes beyond it in the same data-file request (`inode` mode: unit by
unit). A read served from the cache reads nothing ahead, so a sequential reader costs one data-file
request per window, not one per request.

`shared` mode reads ahead in a thread instead (`Loader`), so that the disk works on the next window while
the loop serves this one: a sequential read makes sure the `readahead` bytes after it are cached or on
their way, topping the window up once half of it is used. The loop fetches the checksums, the loader reads
and verifies; its units enter the cache at the next read. A read that needs a unit on its way waits for
it rather than read it twice. A write or a free of a physical block marks the units on their way that hold
it, and those are dropped when they arrive: the cache never takes in bytes older than a write.
"""
from __future__ import annotations

import errno
import operator
import queue
import threading
import time
from collections import OrderedDict

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE
from .blockio import UncachedIO, verified
from .datafile import AlignedBuffer

BS = BLOCK_SIZE
UNIT_BLOCKS = 16
UNIT = UNIT_BLOCKS * BS
ALL_VALID = (1 << UNIT_BLOCKS) - 1


class Entry:
    __slots__ = ("buf", "valid", "phys")

    def __init__(self, buf: bytes, valid: int, phys):
        self.buf = buf          # UNIT bytes, never modified
        self.valid = valid      # bit i: block i verified against its checksum (shared mode)
        self.phys = phys        # physical runs the unit holds (inode mode), for statistics


def _units(buf, sums: list, count: int) -> list[Entry]:
    """`count` units of buf (read from the data file), each block valid if it matches its checksum."""
    ok = verified(buf, sums)
    mv = memoryview(buf)
    return [Entry(bytes(mv[k * UNIT:(k + 1) * UNIT]), _mask(ok[k * UNIT_BLOCKS:(k + 1) * UNIT_BLOCKS]), None)
            for k in range(count)]


def _mask(ok: list) -> int:
    """Bit i set where ok[i] (a unit's blocks)."""
    if all(ok):
        return ALL_VALID
    return sum(1 << i for i, good in enumerate(ok) if good)


_valid = operator.attrgetter("valid")
_buf = operator.attrgetter("buf")


class _Job:
    """Units [u0, u0+count) to load in the loader thread, with the checksums fetched when it was made."""
    __slots__ = ("u0", "count", "sums", "entries", "stale", "done")

    def __init__(self, u0: int, count: int, sums: list):
        self.u0, self.count, self.sums = u0, count, sums
        self.entries: list | None = None       # set by the loader: one Entry per unit, or None
        self.stale: set = set()                # units written or freed since the job was made
        self.done = threading.Event()


class Loader:
    """Threads that read and verify units ahead of sequential readers (see "Readahead"). Two, so that the
    disk has a read to work on while a thread verifies what it just read."""
    THREADS = 2

    def __init__(self, data):
        self.data = data
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, job: _Job) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name="reflinkfs-cache-loader", daemon=True)
                             for _ in range(self.THREADS)]
            for t in self._threads:
                t.start()
        self.jobs.put(job)

    def _run(self) -> None:
        buf = AlignedBuffer()
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                self._load(job, buf)
        finally:
            buf.close()

    def _load(self, job: _Job, mem: AlignedBuffer) -> None:
        try:
            buf = self.data.read(job.u0 * UNIT_BLOCKS, job.count * UNIT_BLOCKS, mem)
            job.entries = _units(buf, job.sums, job.count)
        except Exception:      # noqa: BLE001 - a failed readahead only means the loop reads it itself
            job.entries = None
        finally:
            self.results.put(job)
            job.done.set()

    def close(self) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []


class Policy:
    """Residency bookkeeping by key; the cache stores entries, the policy decides who leaves."""

    def __init__(self, name: str, budget_units: int):
        if name not in ("2q", "lru"):
            raise ValueError(f"unknown eviction policy {name!r} (use 2q or lru)")
        self.name = name
        self.budget = max(1, budget_units)
        self.probation: OrderedDict = OrderedDict()   # 2q: FIFO of first-time units
        self.protected: OrderedDict = OrderedDict()   # LRU (the only queue of `lru`)
        self.ghosts: OrderedDict = OrderedDict()
        self.max_probation = max(1, self.budget // 4)
        self.max_ghosts = self.budget

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def touch(self, key) -> None:
        if key in self.protected:
            self.protected.move_to_end(key)
        # a hit in probation is a correlated reference (same scan): it does not promote

    def touch_range(self, start: int, end: int) -> None:
        """touch() every key in range(start, end)."""
        protected = self.protected
        if protected:
            for key in range(start, end):
                if key in protected:
                    protected.move_to_end(key)

    def insert(self, key) -> list:
        """Admit a newly loaded unit; return the keys to evict (bounded: at most two)."""
        if self.name == "lru":
            self.protected[key] = None
        elif key in self.ghosts:
            del self.ghosts[key]
            self.protected[key] = None
        else:
            self.probation[key] = None
        victims: list = []
        while len(self) > self.budget and len(victims) < 2:
            if self.probation and (len(self.probation) > self.max_probation or not self.protected):
                victim, _ = self.probation.popitem(last=False)
                self.ghosts[victim] = None
                if len(self.ghosts) > self.max_ghosts:
                    self.ghosts.popitem(last=False)
            else:
                victim, _ = self.protected.popitem(last=False)
            victims.append(victim)
        return victims

    def remove(self, key) -> None:
        self.probation.pop(key, None)
        self.protected.pop(key, None)

    def resize(self, budget_units: int) -> list:
        """A new budget; return the keys to evict to fit it (probation first, the oldest first)."""
        self.budget = max(1, budget_units)
        self.max_probation = max(1, self.budget // 4)
        self.max_ghosts = self.budget
        while len(self.ghosts) > self.max_ghosts:
            self.ghosts.popitem(last=False)
        victims: list = []
        while len(self) > self.budget:
            queue_ = self.probation if self.probation else self.protected
            victims.append(queue_.popitem(last=False)[0])
        return victims


class CacheBase(UncachedIO):
    """What the two caches share: storage of units, the policy, statistics."""

    def __init__(self, data, space, lookup, budget: int, policy: str = "2q", readahead: int = 1 << 20):
        super().__init__(data, space, lookup)
        self.entries: dict = {}
        self.policy = Policy(policy, budget // UNIT)
        self.readahead_units = readahead // UNIT
        self._last_end: dict[int, int] = {}      # ino -> logical block where its last read ended
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.readahead_loads = 0
        self.budget_source = "fixed"             # how the budget was chosen (the mount says)
        self.shrinks = 0
        self.last_shrink: dict | None = None     # when and why the budget last went down

    @property
    def held_bytes(self) -> int:
        """Bytes of units in the cache now."""
        return len(self.entries) * UNIT

    @property
    def budget_bytes(self) -> int:
        return self.policy.budget * UNIT

    def _get(self, key, counted: bool = True):
        e = self.entries.get(key)
        if e is not None:
            self.hits += counted
            self.policy.touch(key)
        else:
            self.misses += counted
        return e

    def _put(self, key, entry: Entry) -> None:
        self.entries[key] = entry
        self._indexed(key)
        for victim in self.policy.insert(key):
            if self.entries.pop(victim, None) is not None:
                self.evictions += 1
                self._unindexed(victim)

    def _drop(self, key) -> None:
        if self.entries.pop(key, None) is not None:
            self.policy.remove(key)
            self._unindexed(key)

    def resize(self, budget: int, reason: str | None = None) -> int:
        """Set the budget to `budget` bytes, evicting what no longer fits; return the bytes evicted. A
        smaller budget is recorded as the last shrink, with `reason`."""
        old = self.policy.budget * UNIT
        victims = self.policy.resize(budget // UNIT)
        new = self.policy.budget * UNIT
        freed = 0
        for key in victims:
            if self.entries.pop(key, None) is not None:
                self.evictions += 1
                self._unindexed(key)
                freed += UNIT
        if new < old:
            self.shrinks += 1
            self.last_shrink = {"at": time.time(), "from_bytes": old, "to_bytes": new, "freed_bytes": freed,
                                "reason": reason or "resized"}
        return freed

    def _read(self, ino: int, lstart: int, lend: int, ahead: int) -> list:
        raise NotImplementedError      # each cache reads through its own keys

    def distinct_physical_bytes(self) -> int:
        raise NotImplementedError

    def _indexed(self, key) -> None:
        """A unit became resident (a subclass may index it)."""

    def _unindexed(self, key) -> None:
        """A unit left the cache."""

    def _sequential(self, ino: int, lstart: int, lend: int) -> bool:
        seq = self._last_end.get(ino) == lstart
        self._last_end[ino] = lend
        if len(self._last_end) > 4096:
            self._last_end.clear()
        return seq

    def read_blocks(self, ino: int, lstart: int, lend: int) -> list:
        ahead = self.readahead_units if self._sequential(ino, lstart, lend) else 0
        parts = self._read(ino, lstart, lend, ahead)
        self.bytes_served += (lend - lstart) * BS
        return parts

    def stats(self) -> dict:
        return {"mode": self.name, "policy": self.policy.name, "unit_bytes": UNIT,
                "budget_bytes": self.policy.budget * UNIT, "budget_source": self.budget_source,
                "shrinks": self.shrinks, "last_shrink": self.last_shrink,
                "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "readahead_loads": self.readahead_loads,
                "entries": len(self.entries), "resident_bytes": len(self.entries) * UNIT,
                "distinct_physical_bytes": self.distinct_physical_bytes(),
                "bytes_served": self.bytes_served}


class SharedCache(CacheBase):
    """Keyed by physical unit number: every file mapping a physical range gets the same buffer."""
    name = "shared"
    MAX_INFLIGHT_WINDOWS = 4          # units on their way, at most, in readahead windows
    JOB_UNITS = 8                     # units per loader read: both loader threads work on a window

    def __init__(self, *args, readahead: int = 4 << 20, **kwargs):
        # a deeper window than the inode cache's: it is what keeps the disk busy while the loop serves
        # (measured: 1 MiB reads 1 GiB cold at ~320 MB/s, 4 MiB at ~490, on a disk doing ~576 MB/s)
        kwargs["readahead"] = readahead
        super().__init__(*args, **kwargs)
        self.loader = Loader(self.data)
        self._inflight: dict[int, _Job] = {}     # unit -> the job loading it
        self._ahead_to: dict[int, int] = {}      # ino -> logical block its readahead reaches
        self._topup: dict[int, int] = {}         # ino -> where a cached read should look ahead again

    def close(self) -> None:
        self.loader.close()

    def read_blocks(self, ino: int, lstart: int, lend: int) -> list:
        """Fast path for the commonest read: one extent, all of it in cached, verified units."""
        if not self.loader.results.empty():
            self._collect()
        runs = self.lookup(ino, lstart, lend)
        if len(runs) == 1 and runs[0][0] == lstart and runs[0][2] == lend - lstart:
            views = self._cached_views(runs[0][1], lend - lstart)
            if views is not None:
                seq = self._last_end.get(ino) == lstart
                self._last_end[ino] = lend          # a later read continuing here is sequential
                self.bytes_served += (lend - lstart) * BS
                if seq and lend >= self._topup.get(ino, 0) and self.readahead_units:
                    self._ahead(ino, lend)
                return views
        return super().read_blocks(ino, lstart, lend)

    def _cached_views(self, pb: int, n: int) -> list | None:
        """Buffers holding physical blocks [pb, pb+n) if every unit they touch is cached and verified, else
        None (nothing counted: the general path then does the work). A whole unit is its `bytes` object
        itself; only a partly read unit costs a memoryview."""
        u0, i0 = divmod(pb, UNIT_BLOCKS)
        u1, i1 = divmod(pb + n - 1, UNIT_BLOCKS)
        i1 += 1
        head = ALL_VALID ^ ((1 << i0) - 1)        # the blocks read of the first unit
        tail = (1 << i1) - 1                      # ... and of the last
        get = self.entries.get
        if u0 == u1:
            e = get(u0)
            mask = head & tail
            if e is None or e.valid & mask != mask:
                return None
            views = [e.buf if mask == ALL_VALID else memoryview(e.buf)[i0 * BS:i1 * BS]]
        else:
            es = list(map(get, range(u0, u1 + 1)))
            if None in es:
                return None
            first, last = es[0], es[-1]
            assert first is not None and last is not None
            if (first.valid & head != head or last.valid & tail != tail
                    or (u1 - u0 > 1 and min(map(_valid, es[1:-1])) != ALL_VALID)):
                return None
            views = list(map(_buf, es))
            if i0:
                views[0] = memoryview(first.buf)[i0 * BS:]
            if i1 < UNIT_BLOCKS:
                views[-1] = memoryview(last.buf)[:i1 * BS]
        self.policy.touch_range(u0, u1 + 1)
        self.hits += u1 + 1 - u0
        return views

    def _load_units(self, u0: int, count: int) -> dict:
        """Load `count` consecutive physical units with one data-file read; verify what has a checksum."""
        buf = self.data.read(u0 * UNIT_BLOCKS, count * UNIT_BLOCKS)
        loaded = {}
        for k, e in enumerate(_units(buf, self.space.csums(u0 * UNIT_BLOCKS, count * UNIT_BLOCKS), count)):
            loaded[u0 + k] = e
            self._put(u0 + k, e)
        return loaded

    # -- readahead in the loader thread --------------------------------------------------------
    def _ahead(self, ino: int, lend: int) -> None:
        """Make sure the readahead window after lend is cached or on its way; top it up once half of it
        is used."""
        # never more than half the probation queue: units read ahead and evicted before the reader gets
        # to them would come back as ghosts and flood the protected set (2Q's scan resistance)
        window = max(1, min(self.readahead_units, self.policy.max_probation // 2)) * UNIT_BLOCKS
        reach = self._ahead_to.get(ino, -1)
        if lend + window // 2 <= reach <= lend + window:
            return
        start = reach if lend <= reach <= lend + window else lend
        if len(self._ahead_to) > 4096:
            self._ahead_to.clear()
            self._topup.clear()
        self._ahead_to[ino] = lend + window
        self._topup[ino] = lend + window // 2
        limit = self.MAX_INFLIGHT_WINDOWS * window // UNIT_BLOCKS
        for _, pb, n in self.lookup(ino, start, lend + window):
            u, u_last = pb // UNIT_BLOCKS, (pb + n - 1) // UNIT_BLOCKS
            while u <= u_last:
                if u in self.entries or u in self._inflight:
                    u += 1
                    continue
                run = u
                while (run <= u_last and run not in self.entries and run not in self._inflight
                       and run - u < self.JOB_UNITS):
                    run += 1
                if len(self._inflight) + run - u > limit:
                    return                          # the loader is far enough behind already
                job = _Job(u, run - u, self.space.csums(u * UNIT_BLOCKS, (run - u) * UNIT_BLOCKS))
                for k in range(u, run):
                    self._inflight[k] = job
                self.loader.submit(job)
                u = run

    def _collect(self) -> None:
        """Take in the units the loader has finished, except those written or freed meanwhile."""
        while True:
            try:
                job = self.loader.results.get_nowait()
            except queue.Empty:
                return
            for k in range(job.count):
                u = job.u0 + k
                if self._inflight.get(u) is job:
                    del self._inflight[u]
                if job.entries is not None and u not in job.stale and u not in self.entries:
                    self._put(u, job.entries[k])
                    self.readahead_loads += 1

    def _wait(self, u: int) -> None:
        """A unit the loader is reading is needed now: wait for it (no second read of the same bytes)."""
        job = self._inflight.get(u)
        if job is not None:
            job.done.wait()
            self._collect()

    def settle(self) -> None:
        """Wait for every unit on its way and take it in (for statistics that must add up)."""
        for job in set(self._inflight.values()):
            job.done.wait()
        self._collect()

    def stats(self) -> dict:
        self.settle()
        return super().stats()

    # -- the general read path -----------------------------------------------------------------
    def _read(self, ino: int, lstart: int, lend: int, ahead: int) -> list:
        parts: list = []
        pos = lstart
        for lb, pb, n in self.lookup(ino, lstart, lend):
            if lb > pos:
                parts.append(bytes((lb - pos) * BS))
            parts.extend(self._piece(ino, lb, pb, n))
            pos = lb + n
        if pos < lend:
            parts.append(bytes((lend - pos) * BS))
        if ahead:
            self._ahead(ino, lend)
        return parts

    def _piece(self, ino: int, lb: int, pb: int, n: int) -> list:
        """Views of physical blocks [pb, pb+n) (mapped at logical lb), loading the units missing."""
        u_first, u_last = pb // UNIT_BLOCKS, (pb + n - 1) // UNIT_BLOCKS
        got = {}
        u = u_first
        while u <= u_last:
            if u in self._inflight:
                self._wait(u)
            e = self.entries.get(u)
            if e is not None:
                self.hits += 1
                self.policy.touch(u)
                got[u] = e
                u += 1
                continue
            run = u                             # a run of missing units: one data-file read
            while (run <= u_last and run not in self.entries and run not in self._inflight
                   and run - u < 256):
                run += 1
            run = max(run, u + 1)
            got.update(self._load_units(u, run - u))
            self.misses += run - u
            u = run
        views = []
        p, end = pb, pb + n
        while p < end:
            u = p // UNIT_BLOCKS
            e = got[u]
            i0 = p - u * UNIT_BLOCKS
            i1 = min(UNIT_BLOCKS, end - u * UNIT_BLOCKS)
            mask = ((1 << i1) - 1) & ~((1 << i0) - 1)
            if e.valid & mask != mask:
                bad = next(i for i in range(i0, i1) if not (e.valid >> i) & 1)
                raise FsError(errno.EIO, f"inode {ino}: data at byte offset "
                                         f"{(lb + u * UNIT_BLOCKS + bad - pb) * BS} is damaged (checksum "
                                         f"mismatch at physical block {u * UNIT_BLOCKS + bad})")
            views.append(memoryview(e.buf)[i0 * BS:i1 * BS])
            p = u * UNIT_BLOCKS + i1
        return views

    def _drop_phys_range(self, pblock: int, nblocks: int) -> None:
        for u in range(pblock // UNIT_BLOCKS, (pblock + nblocks - 1) // UNIT_BLOCKS + 1):
            self._drop(u)
            job = self._inflight.get(u)
            if job is not None:
                job.stale.add(u)

    def write(self, ino: int, lblock: int, pblock: int, data) -> None:
        super().write(ino, lblock, pblock, data)
        self._drop_phys_range(pblock, len(data) // BS)

    def drop_phys(self, pblock: int, nblocks: int) -> None:
        self._drop_phys_range(pblock, nblocks)

    def lookup_unit(self, pblock: int):
        """The cached buffer holding a physical block, or None (for tests and inspection)."""
        e = self.entries.get(pblock // UNIT_BLOCKS)
        return e.buf if e else None

    def distinct_physical_bytes(self) -> int:
        return len(self.entries) * UNIT


class InodeCache(CacheBase):
    """Keyed by (inode, logical unit): what a per-inode page cache does. Shared data is cached per file."""
    name = "inode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._units: dict[int, set[int]] = {}     # ino -> its cached units, so dropping a file is O(its units)

    def _unit(self, ino: int, u: int, counted: bool = True) -> Entry:
        key = (ino, u)
        e = self._get(key, counted)
        if e is None:
            lb = u * UNIT_BLOCKS
            runs = []

            def load(lb_, pb, n):
                runs.append((pb, n))
                return [self.load(pb, n, ino, lb_)]
            parts = self.read_mapped(ino, lb, lb + UNIT_BLOCKS, load)
            e = Entry(b"".join(parts), ALL_VALID, tuple(runs))
            self._put(key, e)
        return e

    def _read(self, ino: int, lstart: int, lend: int, ahead: int) -> list:
        views = []
        u_last = (lend - 1) // UNIT_BLOCKS
        if ahead and all((ino, u) in self.entries for u in range(lstart // UNIT_BLOCKS, u_last + 1)):
            ahead = 0                           # served from the cache: nothing to read ahead
        for u in range(lstart // UNIT_BLOCKS, u_last + 1):
            i0 = max(lstart - u * UNIT_BLOCKS, 0)
            i1 = min(lend - u * UNIT_BLOCKS, UNIT_BLOCKS)
            try:
                e = self._unit(ino, u)
            except FsError as err:
                if err.errno != errno.EIO:
                    raise
                # a damaged block must not make the rest of its unit unreadable: read just the requested
                # blocks, verified and uncached (EIO only if the damaged block is among them)
                views.extend(self.read_mapped(ino, u * UNIT_BLOCKS + i0, u * UNIT_BLOCKS + i1,
                                              lambda lb, pb, n: [self.load(pb, n, ino, lb)]))
                continue
            views.append(memoryview(e.buf)[i0 * BS:i1 * BS])
        for u in range(u_last + 1, u_last + 1 + ahead):
            if (ino, u) not in self.entries and self.lookup(ino, u * UNIT_BLOCKS, (u + 1) * UNIT_BLOCKS):
                try:
                    self._unit(ino, u, counted=False)
                except FsError:
                    break                       # damage ahead fails only a read that asks for it
                self.readahead_loads += 1
        return views

    def write(self, ino: int, lblock: int, pblock: int, data) -> None:
        super().write(ino, lblock, pblock, data)
        self.drop_inode(ino, lblock, lblock + len(data) // BS)

    def _indexed(self, key) -> None:
        self._units.setdefault(key[0], set()).add(key[1])

    def _unindexed(self, key) -> None:
        units = self._units[key[0]]
        units.discard(key[1])
        if not units:
            del self._units[key[0]]

    def drop_inode(self, ino: int, lblock: int, lend: int | None) -> None:
        if lend is None and lblock == 0:
            self._last_end.pop(ino, None)
        units = self._units.get(ino)
        if not units:
            return
        u0 = lblock // UNIT_BLOCKS             # units wholly below lblock are still mapped as they were
        u1 = (lend - 1) // UNIT_BLOCKS + 1 if lend is not None else None
        for u in [u for u in units if u >= u0 and (u1 is None or u < u1)]:
            self._drop((ino, u))

    def drop_phys(self, pblock: int, nblocks: int) -> None:
        pass   # a freed block is unmapped from its file first, and that dropped the file's units

    def distinct_physical_bytes(self) -> int:
        from .intervals import coverage as _coverage
        return sum(e - s for s, e, _ in _coverage([r for en in self.entries.values() for r in en.phys])) * BS


def make_io(mode: str, cache_size: int, policy: str = "2q"):
    """A factory for the volume's block I/O: `none`, `shared` or `inode`."""
    if mode == "none":
        return UncachedIO
    cls = {"shared": SharedCache, "inode": InodeCache}.get(mode)
    if cls is None:
        raise ValueError(f"unknown cache mode {mode!r} (use shared, inode or none)")

    def factory(data, space, lookup):
        return cls(data, space, lookup, budget=cache_size, policy=policy)
    return factory
