"""Segments as the core sees them: whether a file is whole (`wholeness`, `whole_usage`), freezing a segment
when its blocks are shared (`freeze`), and finishing at open what a crash cut short (`recover`).

A file is *whole* when one segment holds exactly its bytes, so that the kernel could serve the file
from that segment's file alone (FUSE passthrough maps file offset X to offset X of one backing file,
reads stop at the backing file's end, and every byte of it is visible).

A regular file is whole when all of these hold:
- it maps at least one block, and every mapped block lies in one segment other than 0 (segment 0, the
  shared data file, packs many files and is never whole);
- every mapped block sits at its own logical position in that segment (logical block L at block L);
- the segment's file is exactly as long as the file;
- nothing is in the segment where the file has a hole: no block another file uses (the metadata), and no
  data in the segment's file (SEEK_DATA on it), so the hole reads as zeros through the segment too.

The answer describes the store at this moment: metadata as of the open transaction, the segment's file
as on disk (writes still queued in the data file's writer are of blocks the metadata maps, so they can
only add data where the file has some). It is cheap for a file in segment 0 (one query, no system call)
and costs a stat and a walk of the segment's data ranges otherwise. Read-only; the caller runs it in the
thread that owns the database connection.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..meta.schema import BLOCK_SIZE
from . import extents as ext
from .datafile import SEG_BLOCKS, SEG_SHIFT, locate, seg_base
from .intervals import coverage


@dataclass
class Wholeness:
    segment: int | None    # the one segment holding all the file's mapped blocks; None: no blocks, or several
    whole: bool
    why: str               # why not, one phrase ("" when whole)


def wholeness(db, data, ino: int) -> Wholeness:
    """Whether regular file ino is whole (see the module notes). `data`: the store's DataFile."""
    size = db.execute("SELECT size FROM inodes WHERE ino=?", (ino,)).fetchone()[0]
    runs = ext.all_extents(db, ino)
    if not runs:
        return Wholeness(None, False, "no data blocks")
    segs = {locate(pb)[0] for _, pb, _ in runs} | {locate(pb + n - 1)[0] for _, pb, n in runs}
    if len(segs) > 1:
        return Wholeness(None, False, f"blocks in {len(segs)} segments")
    seg = segs.pop()
    if seg == 0:
        return Wholeness(0, False, "in the shared data file (segment 0)")
    base = seg_base(seg)
    for lb, pb, n in runs:
        if pb != base + lb:
            return Wholeness(seg, False, f"logical block {lb} is at block {pb - base} of its segment")
    layout = data.segment_layout(seg)
    if layout is None:
        return Wholeness(seg, False, "the segment's file is missing")
    seg_size, data_ranges = layout
    if seg_size != size:
        return Wholeness(seg, False, f"the segment's file is {seg_size} bytes, the file {size}")
    mapped = [(lb, n) for lb, _, n in runs]
    used = db.execute("SELECT pblock, nblocks FROM refs WHERE pblock >= ? AND pblock < ? ORDER BY pblock",
                      (base, base + SEG_BLOCKS)).fetchall()
    extra = _outside([(p - base, n) for p, n in used], mapped)
    if extra is not None:
        return Wholeness(seg, False, f"another file uses block {extra} of the segment, a hole of this file")
    extra = _outside([(s, e - s) for s, e in data_ranges], mapped)
    if extra is not None:
        return Wholeness(seg, False, f"the segment holds data at byte {extra * BLOCK_SIZE}, a hole of this file")
    return Wholeness(seg, True, "")


def _outside(ranges, mapped) -> int | None:
    """The first block of `ranges` ((start, n) pairs) not covered by `mapped`, or None."""
    inside = coverage(mapped)
    for start, n in sorted(ranges):
        pos, end = start, start + n
        for s, e, _ in inside:
            if e <= pos:
                continue
            if s > pos:
                return pos
            pos = e
            if pos >= end:
                break
        if pos < end:
            return pos
    return None


def freeze(db, ino: int, runs) -> None:
    """Blocks of `runs` ((lblock, pblock, nblocks)) of file ino are about to be shared: if they lie in
    its own segment, that segment becomes nobody's own, so that no file writes into a segment another
    file reads (segment 0 is nobody's anyway). Only ino can own a segment whose blocks ino maps."""
    own = db.execute("SELECT own_seg FROM inodes WHERE ino=?", (ino,)).fetchone()[0]
    if own and any(locate(pb)[0] == own or locate(pb + n - 1)[0] == own for _, pb, n in runs):
        db.execute("UPDATE inodes SET own_seg=0 WHERE ino=?", (ino,))


def recover(db, data) -> tuple[int, int]:
    """At open, finish what a crash may have cut short after a commit (Space.take_released): set each
    segment's file to the size the metadata keeps it at (writes after the last commit may have grown
    it, or the commit's resize had not run), punch blocks of segments that hold data but no file uses,
    and delete segment files that no segment row lists. Returns (runs punched, files deleted). Costs a
    walk of every segment's data ranges."""
    import os
    from ..errors import StoreError
    from ..meta.schema import SEGS_NAME
    sizes = dict(db.execute("SELECT seg, size_bytes FROM segments"))
    segs = sorted(sizes)
    punch = []
    for seg in segs:
        layout = data.segment_layout(seg)
        base = seg_base(seg)
        if layout is None:
            if db.execute("SELECT 1 FROM refs WHERE pblock >= ? AND pblock < ? LIMIT 1",
                          (base, base + SEG_BLOCKS)).fetchone() is not None:
                raise StoreError(f"{os.path.dirname(data.path)}: segment file {SEGS_NAME}/{seg} is missing but "
                                 f"files use its blocks; the store cannot be used (run fsck)")
            data.set_size(seg, sizes[seg])
            continue
        if layout[0] != sizes[seg]:
            data.set_size(seg, sizes[seg], create=False)
            layout = data.segment_layout(seg)
            assert layout is not None
        base = seg_base(seg)
        used = [(p - base, n) for p, n in db.execute(
            "SELECT pblock, nblocks FROM refs WHERE pblock >= ? AND pblock < ?", (base, base + SEG_BLOCKS))]
        inside = coverage(used)
        for s, e in layout[1]:
            pos = s
            for us, ue, _ in inside:
                if ue <= pos or us >= e:
                    continue
                if us > pos:
                    punch.append((base + pos, us - pos))
                pos = max(pos, ue)
            if pos < e:
                punch.append((base + pos, e - pos))
    folder = os.path.join(os.path.dirname(data.path), SEGS_NAME)
    listed = {str(s) for s in segs}
    stray = [int(n) for n in (os.listdir(folder) if os.path.isdir(folder) else ()) if n not in listed and n.isdigit()]
    if punch or stray:
        data.release(punch, stray)
    return len(punch), len(stray)


def whole_usage(db, data) -> dict:
    """How many regular files are whole, and their bytes. Only files whose blocks all lie in one segment
    other than 0 are examined closely (one query finds them)."""
    files = nbytes = 0
    for ino, size in db.execute(
            "SELECT e.ino, i.size FROM extents e JOIN inodes i ON i.ino = e.ino GROUP BY e.ino "
            "HAVING MIN(e.pblock) >= ? AND MAX(e.pblock + e.nblocks - 1) >> ? = MIN(e.pblock) >> ?",
            (SEG_BLOCKS, SEG_SHIFT, SEG_SHIFT)).fetchall():
        if wholeness(db, data, ino).whole:
            files += 1
            nbytes += size
    return {"whole_files": files, "whole_bytes": nbytes}
