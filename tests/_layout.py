"""Lay files out in segments by hand, on a closed store, for tests of what reads a segment layout (whole
files, fsck, `reflinkfs stat`) before anything in the filesystem allocates into segments other than 0."""
from __future__ import annotations

import os
import sqlite3

import xxhash

from reflinkfs.check import _Blocks, fsck
from reflinkfs.core.datafile import seg_base
from reflinkfs.core.intervals import coverage
from reflinkfs.meta import schema
from reflinkfs.meta.schema import DB_NAME, pack_sums

BS = 4096


def place(store: str, moves: dict[int, int]) -> None:
    """Move each file ino of `moves` to identity layout in segment moves[ino] (a closed store): its bytes
    copied to block L of segs/<seg> (holes stay holes), extents pointed there, the segment's file cut to
    the file's size, the file made the segment's owner; checksums recomputed, refcounts and free space
    rebuilt by fsck's repair. fsck must then find the store clean."""
    data_path = os.path.join(store, schema.DATA_NAME)
    db = sqlite3.connect(os.path.join(store, DB_NAME), isolation_level=None)
    db.execute("BEGIN")
    for ino, seg in moves.items():
        path = os.path.join(store, schema.SEGS_NAME, str(seg))
        size = db.execute("SELECT size FROM inodes WHERE ino=?", (ino,)).fetchone()[0]
        with open(data_path, "rb") as src, open(path, "wb") as dst:
            for lb, pb, n in db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=?", (ino,)).fetchall():
                src.seek(pb * BS)
                dst.seek(lb * BS)
                dst.write(src.read(n * BS))
                db.execute("UPDATE extents SET pblock=? WHERE ino=? AND lblock=?", (seg_base(seg) + lb, ino, lb))
            dst.truncate(size)
        db.execute("INSERT INTO segments(seg, size_bytes) VALUES (?, ?)", (seg, size))
        db.execute("UPDATE inodes SET own_seg=? WHERE ino=?", (seg, ino))
        db.execute("UPDATE meta SET value=MAX(value, ?) WHERE key='next_seg'", (seg + 1,))
    db.execute("DELETE FROM csums")
    used = coverage(db.execute("SELECT pblock, nblocks FROM extents").fetchall())
    with _Blocks(data_path) as f:
        for s, e, _ in used:
            db.execute("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)",
                       (s, e - s, pack_sums([xxhash.xxh3_64_intdigest(f.read(p)) for p in range(s, e)])))
    db.execute("COMMIT")
    db.close()
    fsck(store, repair_=True)              # refcounts and free space, rebuilt from the extent maps
    assert fsck(store, verify_data=True).findings == []
