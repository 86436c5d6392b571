"""Physical space: refcounted runs of used blocks, the free-run allocator, and block checksums.

Guarantees (all inside the caller's open database transaction):
- `refs` holds non-overlapping runs of used blocks, each with a refcount >= 1. `incref`/`decref` split
  runs where a range partially overlaps one (like XFS's refcount btree), so cost is O(runs touched).
- A block whose refcount drops to 0 is not free yet: it goes to `pending`, and becomes allocatable only
  after the transaction that released it commits (`on_commit`). Until then the committed state may still
  refer to it, so it must keep its bytes. Only segment 0 has free runs: a released block of another
  segment is to be punched out of its file once the commit is durable (`take_released`), and a segment
  left with no used block and no owner is dropped from `segments` in the same transaction, its file to be
  deleted after the commit.
- Blocks allocated in the open transaction are remembered in `fresh`: no committed state refers to them,
  so they may be overwritten in place. Everything else is copy-on-write.
- Identity allocation (`new_segment`, `is_free_at`, `alloc_at`): a file's own segment receives its logical
  block L at block L. A position is free there only if no file uses it and no state since the last
  commit did (a block released in the open transaction keeps its bytes for the committed state). Blocks
  of segments other than 0 count against the size limit (`seg_blocks`) until they are punched.
- Segment blocks allocated by an operation that rolled back may have been written already: at the commit
  the ones nothing uses are punched, and a segment made by such an operation (its row rolled back with
  it, its number never handed out again in this session) has its file deleted.
- The allocator prefers one contiguous free run (smallest that fits), then grows the data file, then
  gathers smaller free runs; it raises ENOSPC when the size limit leaves no room.

Callers must run everything here from one thread, between the volume's BEGIN and COMMIT.
"""
from __future__ import annotations

import errno
import sqlite3

from ..errors import FsError
from ..meta.schema import CSUM_RUN, get_meta, set_meta, unpack_sums
from .datafile import SEG_BLOCKS, locate, seg_base
from .intervals import IntervalSet, coverage

Run = tuple[int, int]  # (pblock, nblocks)
SPAN_GAP = 1024         # runs closer than this many blocks are adjusted as one span
CSUM_EXTEND = 64        # writes of at most this many blocks extend the checksum run before them


# -- checksum runs ------------------------------------------------------------------------------
# `csums` rows are runs: (pblock, nblocks, sums), sums packed by schema.pack_sums. Runs never overlap;
# a write stores its sums as one run, or extends the run that ends where it starts (up to CSUM_RUN).

def read_csums(db: sqlite3.Connection, pblock: int, nblocks: int) -> list:
    """The checksums of blocks [pblock, pblock+nblocks): one entry per block, None where there is none."""
    end = pblock + nblocks
    out: list = [None] * nblocks
    rows = db.execute("SELECT pblock, nblocks, sums FROM csums WHERE pblock < ? "
                      "ORDER BY pblock DESC LIMIT 1", (pblock,)).fetchall()
    rows += db.execute("SELECT pblock, nblocks, sums FROM csums WHERE pblock >= ? AND pblock < ?",
                       (pblock, end)).fetchall()
    for p, n, blob in rows:
        lo, hi = max(p, pblock), min(p + n, end)
        if lo < hi:
            out[lo - pblock:hi - pblock] = unpack_sums(blob)[lo - p:hi - p]
    return out


class Space:
    def __init__(self, db: sqlite3.Connection, on_release=None):
        self.db = db
        self._on_release = on_release or (lambda pblock, nblocks: None)
        self.pending: list[Run] = []
        self._punch: list[Run] = []       # committed-free blocks of segments other than 0, not punched yet
        self._gone: list[int] = []        # segments dropped by the commit, their files not deleted yet
        self.seg_allocs: list[Run] = []   # segment blocks allocated in this transaction (see rollback_to)
        self._unwound: list[Run] = []     # ... by operations that rolled back: punched at the commit if unused
        self._check: set[int] = set()     # segments that may have lost their last user and owner (or row)
        self._pending_segs = IntervalSet()  # the blocks of `pending` outside segment 0
        self.fresh = IntervalSet()
        self.data_blocks = get_meta(db, "data_blocks")
        self.limit_blocks = get_meta(db, "size_limit_blocks")
        self.next_seg = get_meta(db, "next_seg")   # never goes back within a session, even on rollback
        self.seg_blocks = self._count_seg_blocks()

    # -- refcounts ---------------------------------------------------------------------------
    def _split_at(self, pblock: int) -> None:
        """Make sure no refs run straddles pblock (a run may start at it)."""
        row = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock < ? "
                              "ORDER BY pblock DESC LIMIT 1", (pblock,)).fetchone()
        if row and row[0] + row[1] > pblock:
            start, n, rc = row
            self.db.execute("UPDATE refs SET nblocks=? WHERE pblock=?", (pblock - start, start))
            self.db.execute("INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, ?, ?)",
                            (pblock, start + n - pblock, rc))

    def incref(self, pblock: int, nblocks: int) -> None:
        self.adjust([(pblock, nblocks)], +1)

    def decref(self, pblock: int, nblocks: int) -> None:
        self.adjust([(pblock, nblocks)], -1)

    def adjust(self, runs, delta: int) -> None:
        """Add delta (+1 or -1) to the refcount of every block of `runs` (which may overlap: a block in
        k runs changes by k * delta). Runs close together are handled as one span, with one scan of
        `refs` and one rewrite of it, so cloning or freeing a file of many extents costs a few
        statements per span instead of several per extent."""
        pieces = coverage(runs)
        i = 0
        while i < len(pieces):
            j = i
            while j + 1 < len(pieces) and pieces[j + 1][0] - pieces[j][1] <= SPAN_GAP:
                j += 1
            self._adjust_span(pieces[i:j + 1], delta)
            i = j + 1

    def _adjust_whole_rows(self, rows, pieces, lo: int, hi: int, delta: int) -> bool:
        """The common case — each used run of the span lies inside one piece of count 1, and the pieces
        are all in use — in two statements for the whole span. False if the case does not apply."""
        k = covered = 0
        npieces = len(pieces)
        freed: list[Run] = []
        ps, pe, pc = pieces[0]
        for start, n, rc in rows:
            while pe <= start:
                k += 1
                if k == npieces:
                    return False
                ps, pe, pc = pieces[k]
            if ps > start or start + n > pe or pc != 1:
                return False
            covered += n
            if rc + delta == 0:
                freed.append((start, n))
        if covered != sum(e - s for s, e, _ in pieces):
            return False          # some block is not in use: the general path reports the damage
        if freed:
            self.db.execute("DELETE FROM refs WHERE pblock >= ? AND pblock < ? AND refcount = 1", (lo, hi))
        self.db.execute("UPDATE refs SET refcount = refcount + ? WHERE pblock >= ? AND pblock < ?", (delta, lo, hi))
        self._after_adjust(freed, lo, hi)
        return True

    def _adjust_span(self, pieces: list[tuple[int, int, int]], delta: int) -> None:
        lo, hi = pieces[0][0], pieces[-1][1]
        self._split_at(lo)
        self._split_at(hi)
        rows = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock >= ? AND pblock < ? "
                               "ORDER BY pblock", (lo, hi)).fetchall()
        if self._adjust_whole_rows(rows, pieces, lo, hi, delta):
            return
        # every block to adjust must be in use: walk the used rows and the pieces together
        out: list[list[int]] = []     # new rows [start, n, refcount], adjacent equal counts merged
        freed: list[Run] = []
        k = 0
        covered = 0
        for start, n, rc in rows:
            end = start + n
            pos = start
            while k < len(pieces) and pieces[k][1] <= pos:
                k += 1
            kk = k
            while pos < end:
                if kk < len(pieces) and pieces[kk][0] < end:
                    s, e, c = pieces[kk]
                    if s > pos:
                        _append_run(out, pos, s - pos, rc)
                        pos = s
                        continue
                    e2 = min(e, end)
                    new = rc + delta * c
                    covered += e2 - pos
                    if new > 0:
                        _append_run(out, pos, e2 - pos, new)
                    elif new == 0:
                        freed.append((pos, e2 - pos))
                    else:
                        raise FsError(errno.EIO, f"store damaged: refcount of physical block {pos} would go "
                                                 f"below zero (run fsck)")
                    pos = e2
                    if e <= end:
                        kk += 1
                else:
                    _append_run(out, pos, end - pos, rc)
                    pos = end
        if covered != sum(e - s for s, e, _ in pieces):
            raise FsError(errno.EIO, f"store damaged: physical blocks in {lo}..{hi - 1} are mapped but not "
                                     f"marked in use (run fsck)")
        self.db.execute("DELETE FROM refs WHERE pblock >= ? AND pblock < ?", (lo, hi))
        self.db.executemany("INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, ?, ?)", out)
        self._after_adjust(freed, lo, hi)

    def _after_adjust(self, freed: list[Run], lo: int, hi: int) -> None:
        for start, n in _coalesce(freed):
            self.clear_csums(start, n)
            self.pending.append((start, n))
            if start >= SEG_BLOCKS:
                self._pending_segs.add(start, start + n)
            self._on_release(start, n)
        if len(self.fresh):
            # shared now, or freed: either way not to be overwritten in place (the gaps of the span
            # lose their freshness too; that only means copy-on-write for them, never a wrong write)
            self.fresh.remove(lo, hi)

    def refcount(self, pblock: int) -> int:
        row = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock <= ? "
                              "ORDER BY pblock DESC LIMIT 1", (pblock,)).fetchone()
        return row[2] if row and row[0] + row[1] > pblock else 0

    def refcounts(self, pblock: int, nblocks: int) -> list[tuple[int, int, int]]:
        """(pblock, nblocks, refcount) pieces covering [pblock, pblock+nblocks), without splitting."""
        end = pblock + nblocks
        first = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock <= ? "
                                "ORDER BY pblock DESC LIMIT 1", (pblock,)).fetchall()
        rest = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock > ? AND "
                               "pblock < ? ORDER BY pblock", (pblock, end)).fetchall()
        out = []
        for s, n, rc in first + rest:
            lo, hi = max(s, pblock), min(s + n, end)
            if lo < hi:
                out.append((lo, hi - lo, rc))
        return out

    # -- allocation --------------------------------------------------------------------------
    def free_blocks(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(nblocks), 0) FROM free").fetchone()[0]

    def _count_seg_blocks(self) -> int:
        """Blocks that segments other than 0 hold: used ones, and released ones not punched yet."""
        used = self.db.execute("SELECT COALESCE(SUM(nblocks), 0) FROM refs WHERE pblock >= ?",
                               (SEG_BLOCKS,)).fetchone()[0]
        return used + sum(n for p, n in self.pending if p >= SEG_BLOCKS)

    def room_to_grow(self) -> int | None:
        """Blocks the size limit leaves for growing segment 0 or filling other segments (None: no limit)."""
        if not self.limit_blocks:
            return None
        return max(0, self.limit_blocks - self.data_blocks - self.seg_blocks)

    # -- segments ------------------------------------------------------------------------------
    def new_segment(self, ino: int, size_bytes: int) -> int:
        """A new segment, made the own segment of inode ino, kept at size_bytes."""
        seg = self.next_seg
        self.next_seg += 1
        set_meta(self.db, "next_seg", self.next_seg)
        self.db.execute("INSERT INTO segments(seg, size_bytes) VALUES (?, ?)", (seg, size_bytes))
        self.db.execute("UPDATE inodes SET own_seg=? WHERE ino=?", (seg, ino))
        self._check.add(seg)        # its file is deleted at the commit if the operation rolls back
        return seg

    def abandon(self, seg: int) -> None:
        """seg may no longer be anyone's own segment: drop it at the commit if nobody uses it then."""
        if seg:
            self._check.add(seg)

    def is_free_at(self, pblock: int, nblocks: int) -> bool:
        """Whether blocks [pblock, pblock+nblocks) of a segment other than 0 may be allocated: no file uses
        them and none did since the last commit."""
        end = pblock + nblocks
        if any(inside for _, _, inside in self._pending_segs.pieces(pblock, end)):
            return False
        row = self.db.execute("SELECT pblock, nblocks FROM refs WHERE pblock < ? ORDER BY pblock DESC LIMIT 1",
                              (end,)).fetchone()
        return not (row and row[0] + row[1] > pblock)

    def alloc_at(self, pblock: int, nblocks: int) -> None:
        """Allocate blocks [pblock, pblock+nblocks) of a segment other than 0 (is_free_at must hold, and
        the caller checks room_to_grow)."""
        self._insert_ref1(pblock, nblocks)
        self.fresh.add(pblock, pblock + nblocks)
        self.seg_blocks += nblocks
        self.seg_allocs.append((pblock, nblocks))

    def pending_end(self, seg: int) -> int:
        """The end (block within the segment) of the last block of seg released in the open transaction:
        the committed state may still read blocks up to there."""
        base = seg_base(seg)
        ends = [e for _, e, inside in self._pending_segs.pieces(base, base + SEG_BLOCKS) if inside]
        return ends[-1] - base if ends else 0

    def alloc(self, nblocks: int) -> list[Run]:
        """Allocate nblocks blocks (refcount 1) as few runs as possible."""
        assert nblocks > 0
        row = self.db.execute("SELECT pblock, nblocks FROM free WHERE nblocks >= ? "
                              "ORDER BY nblocks, pblock LIMIT 1", (nblocks,)).fetchone()
        if row:
            runs = [self._take_free(row[0], row[1], nblocks)]
        else:
            runs = []
            need = nblocks
            room = self.room_to_grow()
            grow = need if room is None else min(need, room)
            # free space at the very end of the file extends into the growth: one run, not two
            tail = self.db.execute("SELECT pblock, nblocks FROM free ORDER BY pblock DESC LIMIT 1").fetchone()
            if tail and tail[0] + tail[1] == self.data_blocks and (room is None or tail[1] + room >= need):
                runs.append(self._take_free(tail[0], tail[1], tail[1]))
                need -= tail[1]
                grow = need
            if grow < need:
                have = self.free_blocks()
                if have + grow < need:
                    raise FsError(errno.ENOSPC, "no space left in the store")
                for start, n in self.db.execute("SELECT pblock, nblocks FROM free ORDER BY nblocks DESC, "
                                                "pblock").fetchall():
                    if need <= grow:
                        break
                    take = min(n, need - grow)
                    runs.append(self._take_free(start, n, take))
                    need -= take
            if need:
                runs.append((self.data_blocks, need))
                self.data_blocks += need
                set_meta(self.db, "data_blocks", self.data_blocks)
        runs = _coalesce(runs)
        for start, n in runs:
            self._insert_ref1(start, n)
            self.fresh.add(start, start + n)
        return runs

    def _insert_ref1(self, start: int, n: int) -> None:
        """Insert a refcount-1 run, merged with refcount-1 neighbours to keep `refs` small."""
        prev = self.db.execute("SELECT pblock, nblocks, refcount FROM refs WHERE pblock < ? "
                               "ORDER BY pblock DESC LIMIT 1", (start,)).fetchone()
        nxt = self.db.execute("SELECT nblocks, refcount FROM refs WHERE pblock=?", (start + n,)).fetchone()
        if nxt and nxt[1] == 1:
            self.db.execute("DELETE FROM refs WHERE pblock=?", (start + n,))
            n += nxt[0]
        if prev and prev[2] == 1 and prev[0] + prev[1] == start:
            self.db.execute("UPDATE refs SET nblocks=? WHERE pblock=?", (prev[1] + n, prev[0]))
        else:
            self.db.execute("INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, ?, 1)", (start, n))

    def _take_free(self, start: int, n: int, take: int) -> Run:
        self.db.execute("DELETE FROM free WHERE pblock=?", (start,))
        if take < n:
            self.db.execute("INSERT INTO free(pblock, nblocks) VALUES (?, ?)", (start + take, n - take))
        return (start, take)

    def on_commit(self) -> None:
        """Called inside the transaction, just before COMMIT: released blocks become free runs (segment 0)
        or blocks to punch (other segments); segments nobody uses or owns are dropped."""
        segs = set(self._check)
        for start, n in self._unwound:      # written by an operation that rolled back, unless used again
            pos = start
            for p, m, _ in self.refcounts(start, n):
                if p > pos:
                    self._punch.append((pos, p - pos))
                pos = p + m
            if pos < start + n:
                self._punch.append((pos, start + n - pos))
            segs.add(locate(start)[0])
        self._unwound.clear()
        self.seg_allocs.clear()
        for start, n in _coalesce(sorted(self.pending)):
            if start < SEG_BLOCKS:
                self._add_free(start, n)
            else:
                self._punch.append((start, n))
                self.seg_blocks -= n
                segs.add(locate(start)[0])
        self.pending.clear()
        self._pending_segs.clear()
        self._check.clear()
        for seg in sorted(segs):
            base = seg_base(seg)
            if self.db.execute("SELECT 1 FROM segments WHERE seg=?", (seg,)).fetchone() is None:
                self._gone.append(seg)      # made by an operation that rolled back: its file may exist
            elif (self.db.execute("SELECT 1 FROM refs WHERE pblock >= ? AND pblock < ? LIMIT 1",
                                  (base, base + SEG_BLOCKS)).fetchone() is None and
                    self.db.execute("SELECT 1 FROM inodes WHERE own_seg=? AND own_seg != 0 LIMIT 1", (seg,)).fetchone() is None):
                self.db.execute("DELETE FROM segments WHERE seg=?", (seg,))
                self._gone.append(seg)

    def take_released(self) -> tuple[list[Run], list[int]]:
        """(blocks to punch, segments to delete) that the last commit released; the caller hands them to
        the data file once that commit is durable."""
        out = (self._punch, self._gone)
        self._punch, self._gone = [], []
        return out

    def after_commit(self) -> None:
        self.fresh.clear()

    def rollback_to(self, mark: int, alloc_mark: int | None = None) -> None:
        """An operation was rolled back: forget what it released and the file growth it took.
        Blocks it allocated stay in `fresh`; that is harmless, since nothing maps them now. Segment
        blocks it allocated may have been written already: they are punched after the commit."""
        if alloc_mark is None:
            alloc_mark = len(self.seg_allocs)
        for p, n in self.seg_allocs[alloc_mark:]:
            self._unwound.append((p, n))
            self._check.add(locate(p)[0])
        del self.seg_allocs[alloc_mark:]
        del self.pending[mark:]
        self._pending_segs.clear()
        for p, n in self.pending:
            if p >= SEG_BLOCKS:
                self._pending_segs.add(p, p + n)
        self.data_blocks = get_meta(self.db, "data_blocks")
        self.seg_blocks = self._count_seg_blocks()

    def _add_free(self, start: int, n: int) -> None:
        prev = self.db.execute("SELECT pblock, nblocks FROM free WHERE pblock < ? ORDER BY pblock DESC "
                               "LIMIT 1", (start,)).fetchone()
        if prev and prev[0] + prev[1] == start:
            self.db.execute("DELETE FROM free WHERE pblock=?", (prev[0],))
            start, n = prev[0], prev[1] + n
        nxt = self.db.execute("SELECT nblocks FROM free WHERE pblock=?", (start + n,)).fetchone()
        if nxt:
            self.db.execute("DELETE FROM free WHERE pblock=?", (start + n,))
            n += nxt[0]
        self.db.execute("INSERT INTO free(pblock, nblocks) VALUES (?, ?)", (start, n))

    # -- checksums ---------------------------------------------------------------------------
    def set_csums(self, pblock: int, sums: bytes) -> None:
        """Record the checksums (packed, see pack_sums) of the blocks from pblock on: as a new run, or, for a
        small write, by extending the run that ends at pblock (up to CSUM_RUN blocks), so that a file
        written in small pieces still has few runs. A large write gets a run of its own: extending would
        rewrite the whole run's BLOB for every write."""
        n = len(sums) // 8
        before = self.clear_csums(pblock, n)
        if before is not None and n <= CSUM_EXTEND and before[1] + n <= CSUM_RUN:
            p, m = before
            blob = self.db.execute("SELECT sums FROM csums WHERE pblock=?", (p,)).fetchone()[0]
            self.db.execute("UPDATE csums SET nblocks=?, sums=? WHERE pblock=?", (m + n, blob + sums, p))
        else:
            self.db.execute("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)", (pblock, n, sums))

    def clear_csums(self, pblock: int, nblocks: int):
        """Forget the checksums of blocks [pblock, pblock+nblocks); runs reaching outside are cut.
        Returns (pblock, nblocks) of the run that now ends at pblock, or None. (BLOBs are read only
        where a run is cut.)"""
        end = pblock + nblocks
        db = self.db
        prev = db.execute("SELECT pblock, nblocks FROM csums WHERE pblock < ? ORDER BY pblock DESC LIMIT 1",
                          (pblock,)).fetchone()
        last = db.execute("SELECT pblock, nblocks FROM csums WHERE pblock >= ? AND pblock < ? "
                          "ORDER BY pblock DESC LIMIT 1", (pblock, end)).fetchone()
        keep = None                                  # (pblock, nblocks, sums) of the piece past the end
        before = prev if prev and prev[0] + prev[1] == pblock else None
        if prev and prev[0] + prev[1] > pblock:
            p, n = prev
            blob = db.execute("SELECT sums FROM csums WHERE pblock=?", (p,)).fetchone()[0]
            before = (p, pblock - p)
            db.execute("UPDATE csums SET nblocks=?, sums=? WHERE pblock=?", (pblock - p, blob[:8 * (pblock - p)], p))
            if p + n > end:
                keep = (end, p + n - end, blob[8 * (end - p):])
        if last and last[0] + last[1] > end:
            p, n = last
            blob = db.execute("SELECT sums FROM csums WHERE pblock=?", (p,)).fetchone()[0]
            keep = (end, p + n - end, blob[8 * (end - p):])
        if last:
            db.execute("DELETE FROM csums WHERE pblock >= ? AND pblock < ?", (pblock, end))
        if keep:
            db.execute("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)", keep)
        return before

    def csums(self, pblock: int, nblocks: int) -> list:
        return read_csums(self.db, pblock, nblocks)


def _coalesce(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


def _append_run(out: list[list[int]], start: int, n: int, rc: int) -> None:
    if out and out[-1][0] + out[-1][1] == start and out[-1][2] == rc:
        out[-1][1] += n
    else:
        out.append([start, n, rc])
