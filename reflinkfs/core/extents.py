"""Per-file extent maps: sorted, non-overlapping runs (lblock -> pblock, nblocks); gaps are holes.

These functions only edit the `extents` table and each inode's `blocks` count; the caller adjusts
refcounts for what it maps and unmaps. Adjacent runs that are contiguous both logically and physically
are merged, so a file written sequentially stays one extent.
"""
from __future__ import annotations

import sqlite3

Extent = tuple[int, int, int]  # (lblock, pblock, nblocks)


def lookup(db: sqlite3.Connection, ino: int, start: int, end: int) -> list[Extent]:
    """Extents overlapping logical blocks [start, end), clipped to it, in order."""
    if start >= end:
        return []
    rows = db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock<=? "
                      "ORDER BY lblock DESC LIMIT 1", (ino, start)).fetchall()
    rows += db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock>? AND lblock<? "
                       "ORDER BY lblock", (ino, start, end)).fetchall()
    # only the first and the last row can stick out of [start, end)
    while rows and rows[0][0] + rows[0][2] <= start:
        rows.pop(0)
    if not rows:
        return rows
    lb, pb, n = rows[0]
    if lb < start:
        rows[0] = (start, pb + start - lb, lb + n - start)
    lb, pb, n = rows[-1]
    if lb + n > end:
        rows[-1] = (lb, pb, end - lb)
    return rows


def all_extents(db: sqlite3.Connection, ino: int) -> list[Extent]:
    return db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? ORDER BY lblock",
                      (ino,)).fetchall()


def unmap(db: sqlite3.Connection, ino: int, start: int, end: int) -> list[Extent]:
    """Remove the mapping of logical blocks [start, end); return the removed (clipped) extents."""
    removed = lookup(db, ino, start, end)
    if not removed:
        return removed
    first = db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock<=? "
                       "ORDER BY lblock DESC LIMIT 1", (ino, start)).fetchone()
    last = db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock<? "
                      "ORDER BY lblock DESC LIMIT 1", (ino, end)).fetchone()
    db.execute("DELETE FROM extents WHERE ino=? AND lblock>=? AND lblock<?", (ino, start, end))
    if first and first[0] < start and first[0] + first[2] > start:
        db.execute("UPDATE extents SET nblocks=? WHERE ino=? AND lblock=?", (start - first[0], ino, first[0]))
    if last and last[0] + last[2] > end:
        lb, pb, n = last
        db.execute("INSERT INTO extents(ino, lblock, pblock, nblocks) VALUES (?, ?, ?, ?)",
                   (ino, end, pb + (end - lb), lb + n - end))
    db.execute("UPDATE inodes SET blocks=blocks-? WHERE ino=?", (sum(e[2] for e in removed), ino))
    return removed


def map_run(db: sqlite3.Connection, ino: int, lblock: int, pblock: int, nblocks: int) -> None:
    """Map [lblock, lblock+nblocks) -> pblock..; the logical range must be unmapped."""
    prev = db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock<? "
                      "ORDER BY lblock DESC LIMIT 1", (ino, lblock)).fetchone()
    nxt = db.execute("SELECT pblock, nblocks FROM extents WHERE ino=? AND lblock=?",
                     (ino, lblock + nblocks)).fetchone()
    n = nblocks
    if nxt and nxt[0] == pblock + nblocks:
        db.execute("DELETE FROM extents WHERE ino=? AND lblock=?", (ino, lblock + nblocks))
        n += nxt[1]
    if prev and prev[0] + prev[2] == lblock and prev[1] + prev[2] == pblock:
        db.execute("UPDATE extents SET nblocks=? WHERE ino=? AND lblock=?", (prev[2] + n, ino, prev[0]))
    else:
        db.execute("INSERT INTO extents(ino, lblock, pblock, nblocks) VALUES (?, ?, ?, ?)",
                   (ino, lblock, pblock, n))
    db.execute("UPDATE inodes SET blocks=blocks+? WHERE ino=?", (nblocks, ino))


def map_runs(db: sqlite3.Connection, ino: int, runs: list[Extent]) -> None:
    """Map many sorted, non-overlapping runs into an unmapped logical range at once (a clone)."""
    if not runs:
        return
    merged: list[list[int]] = []
    for lb, pb, n in runs:
        if merged and merged[-1][0] + merged[-1][2] == lb and merged[-1][1] + merged[-1][2] == pb:
            merged[-1][2] += n
        else:
            merged.append([lb, pb, n])
    first, last = merged[0], merged[-1]
    if len(merged) == 1:
        map_run(db, ino, *first)
        return
    map_run(db, ino, *first)          # merges with the neighbour before the range, if contiguous
    db.executemany("INSERT INTO extents(ino, lblock, pblock, nblocks) VALUES (?, ?, ?, ?)",
                   [(ino, lb, pb, n) for lb, pb, n in merged[1:-1]])
    db.execute("UPDATE inodes SET blocks=blocks+? WHERE ino=?", (sum(m[2] for m in merged[1:-1]), ino))
    map_run(db, ino, *last)           # ... and with the one after it


SCAN_BATCH = 256   # the most extents fetched per query while first_hole walks a run with no gap


def _covering(db: sqlite3.Connection, ino: int, lblock: int) -> Extent | None:
    """The extent that maps logical block lblock, or None when lblock is in a hole."""
    row = db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? AND lblock<=? "
                     "ORDER BY lblock DESC LIMIT 1", (ino, lblock)).fetchone()
    return row if row is not None and row[0] + row[2] > lblock else None


def first_mapped(db: sqlite3.Connection, ino: int, lblock: int) -> int | None:
    """The first logical block at or after lblock that an extent maps, or None (holes to the end).
    Two indexed lookups, whatever the size of the file or of its map."""
    if _covering(db, ino, lblock) is not None:
        return lblock
    row = db.execute("SELECT lblock FROM extents WHERE ino=? AND lblock>? ORDER BY lblock LIMIT 1",
                     (ino, lblock)).fetchone()
    return row[0] if row else None


def first_hole(db: sqlite3.Connection, ino: int, lblock: int, limit: int = 1 << 62) -> int:
    """The first logical block at or after lblock that no extent maps, or `limit` if all blocks up to it
    are mapped. Extents that follow each other without a gap are walked (their physical blocks need not
    be contiguous): the cost is O(extents walked), never O(blocks). Usually the next extent is not
    adjacent, so the first query fetches one row; a run with no gap is fetched in growing batches, up
    to SCAN_BATCH rows (a batch of 256 where one row answers costs 7 times as much)."""
    first = _covering(db, ino, lblock)
    if first is None:
        return lblock
    end = first[0] + first[2]
    batch = 1
    while end < limit:
        rows = db.execute("SELECT lblock, nblocks FROM extents WHERE ino=? AND lblock>=? AND lblock<? "
                          "ORDER BY lblock LIMIT ?", (ino, end, limit, batch)).fetchall()
        for lb, n in rows:
            if lb != end:
                return end
            end = lb + n
        if len(rows) < batch:
            break
        batch = min(4 * batch, SCAN_BATCH)
    return min(end, limit)
