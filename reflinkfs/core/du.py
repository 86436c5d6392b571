"""Space used by trees of files, the way `btrfs filesystem du` and `compsize` count it: `reflinkfs du`.

For a set of roots (inodes: directories or files), the files are the distinct regular-file inodes a
root names, itself or anywhere in the tree below it (a hard link reached twice counts once; symlinks
are not followed). Over those files, in bytes (4 KiB blocks; holes count nothing):

  total          what the files map: the sum of their mapped blocks (`reflinkfs stat`'s shared +
                 exclusive, summed over the files)
  exclusive      the part of `total` in blocks of refcount 1 (the sum of `stat`'s exclusive bytes;
                 btrfs du's "Exclusive")
  shared         total - exclusive: the part in blocks that are referenced more than once
  set_shared     the distinct physical blocks of refcount > 1 the files map, each counted once
                 (btrfs du's "Set shared")
  physical       the distinct physical blocks the files map: exclusive + set_shared (compsize's
                 "Disk Usage")
  set_exclusive  the distinct physical blocks that only these files refer to: what deleting them all
                 would free (unless a file is also linked, or held open, elsewhere)

`usage()` answers for each root alone and, given several roots, for their union too, with
`shared_between`: the physical blocks that files of two or more of the roots map.

Cost: one recursive query per root for its inodes, then one query for their extents, each clipped to the
refcounted runs it lies in; the overlaps are counted in Python with one sort (intervals.coverage).
Runs on the daemon's loop thread, like every request, so it sees uncommitted changes.
"""
from __future__ import annotations

import bisect
import sqlite3

from ..meta.schema import BLOCK_SIZE
from .intervals import coverage

# Every regular file under a root (UNION, not UNION ALL: an inode reached twice is kept once).
_TREE = """
WITH RECURSIVE tree(ino) AS (SELECT ? UNION SELECT d.ino FROM dirents d JOIN tree t ON d.parent = t.ino)
"""
# Each extent of those files clipped to each refcounted run it overlaps: (start, end, refcount, run start,
# run end). The run holding the extent's first block is the last one starting at or before it.
_PIECES = _TREE + """
SELECT max(e.pblock, r.pblock), min(e.pblock + e.nblocks, r.pblock + r.nblocks), r.refcount,
       r.pblock, r.pblock + r.nblocks
FROM tree t JOIN inodes i ON i.ino = t.ino AND (i.mode & 61440) = 32768
JOIN extents e ON e.ino = t.ino
JOIN refs r ON r.pblock >= coalesce((SELECT max(pblock) FROM refs WHERE pblock <= e.pblock), 0)
           AND r.pblock < e.pblock + e.nblocks
WHERE r.pblock + r.nblocks > e.pblock
"""


def _pieces(db: sqlite3.Connection, root: int) -> list[tuple[int, int, int, int, int]]:
    return db.execute(_PIECES, (root,)).fetchall()


def _figures(pieces) -> tuple[dict, list[tuple[int, int]]]:
    """The figures of one set of pieces, and the physical runs they cover (sorted, disjoint)."""
    total = sum(e - s for s, e, _, _, _ in pieces)
    exclusive = sum(e - s for s, e, rc, _, _ in pieces if rc == 1)
    runs = sorted({(rs, re, rc) for _, _, rc, rs, re in pieces})
    starts = [r[0] for r in runs]
    set_shared = physical = set_exclusive = 0
    covered = []
    for s, e, k in coverage([(s, e - s) for s, e, _, _, _ in pieces]):
        covered.append((s, e - s))
        # a covered stretch may span adjacent runs of different refcounts: split it at run boundaries
        i = bisect.bisect_right(starts, s) - 1
        while s < e:
            rs, re, rc = runs[i]
            hi = min(e, re)
            n = hi - s
            physical += n
            if rc > 1:
                set_shared += n
            if k == rc:          # every reference to these blocks comes from these files
                set_exclusive += n
            s, i = hi, i + 1
    bs = BLOCK_SIZE
    return ({"total": total * bs, "exclusive": exclusive * bs, "shared": (total - exclusive) * bs,
             "set_shared": set_shared * bs, "physical": physical * bs, "set_exclusive": set_exclusive * bs},
            covered)


def usage(db: sqlite3.Connection, roots: list[int]) -> dict:
    """{"paths": [figures of each root], "set": figures of their union + shared_between (several roots)}."""
    per_root = [_pieces(db, r) for r in roots]
    out: dict = {"block_size": BLOCK_SIZE, "paths": []}
    covers = []
    for pieces in per_root:
        figures, covered = _figures(pieces)
        out["paths"].append(figures)
        covers.append(covered)
    if len(roots) > 1:
        union, _ = _figures(_union_pieces(db, roots))
        between = sum(e - s for s, e, k in coverage([r for c in covers for r in c]) if k >= 2)
        out["set"] = {**union, "shared_between": between * BLOCK_SIZE}
    return out


def _union_pieces(db: sqlite3.Connection, roots: list[int]) -> list:
    """The pieces of the distinct files under any of the roots (a file under two roots counts once)."""
    marks = ",".join("?" * len(roots))
    q = _PIECES.replace("SELECT ? UNION", f"SELECT ino FROM inodes WHERE ino IN ({marks}) UNION", 1)
    return db.execute(q, roots).fetchall()
