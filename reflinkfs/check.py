"""fsck: one function per invariant of a store, and repairs for what can be repaired.

The extent maps are the truth about which file owns which bytes; refcounts, free space and block counts
are derived from them and can be rebuilt. What cannot be rebuilt (a block whose checksum does not match,
an extent past the end of the data file) is reported, and repair turns it into a hole only where the data
is gone anyway.

Each check returns a list of findings (one line each). `fsck()` runs them all; tests use it as the oracle
after every operation.
"""
from __future__ import annotations

import bisect
import os
import stat
import sqlite3
import typing
from dataclasses import dataclass, field

import xxhash

from .meta import schema
from .meta.schema import BLOCK_SIZE, ROOT_INO, pack_sums, unpack_sums
from .core import acl
from .core.datafile import SEG_BLOCKS, file_layout, locate, seg_base, segment_path
from .core.intervals import coverage as _coverage
from .errors import FsError
from .core.space import read_csums
from .core.treeclone import STAGING_PARENT

BS = BLOCK_SIZE


class _Blocks:
    """Reads physical blocks through the segment files (one open at a time: fsck reads in pblock order).
    A block past the end of its segment's file, or in a segment whose file is missing, reads as zeros."""

    def __init__(self, data_path: str):
        self.data_path = data_path
        self._seg: int | None = None
        self._f: typing.BinaryIO | None = None

    def read(self, pblock: int) -> bytes:
        seg, pos = locate(pblock)
        if seg != self._seg:
            self.close()
            self._seg = seg
            try:
                self._f = open(segment_path(self.data_path, seg), "rb")
            except FileNotFoundError:
                self._f = None
        if self._f is None:
            return bytes(BS)
        self._f.seek(pos)
        return self._f.read(BS).ljust(BS, b"\0")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._seg, self._f = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Report:
    findings: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def leftovers(self) -> list[str]:
        """Findings a crash leaves in a sound store and the next mount finishes (see is_leftover)."""
        return [f for f in self.findings if is_leftover(f)]

    @property
    def damage(self) -> list[str]:
        """The other findings: what no crash of reflinkfs leaves behind."""
        return [f for f in self.findings if not is_leftover(f)]


# What a crash may leave, each finished by the next mount: an inode unlinked while open, a segment file
# the commit deleted (or that an uncommitted operation made), blocks the commit freed but did not punch
# yet (or that an uncommitted write filled), a segment file whose size the commit had not set yet.
LEFTOVER_MARKS = ("freed at next mount)", "the next mount deletes it)", "the next mount punches them)",
                  "the next mount sets its size)")


def is_leftover(finding: str) -> bool:
    return finding.endswith(LEFTOVER_MARKS)


def _diff(a: list[tuple[int, int, int]], b: list[tuple[int, int, int]]):
    """Ranges where two piecewise-constant functions differ: (start, end, value_a, value_b)."""
    pts = sorted({p for s, e, _ in a + b for p in (s, e)})

    def at(runs, p, idx):
        i = idx[0]
        while i < len(runs) and runs[i][1] <= p:
            i += 1
        idx[0] = i
        return runs[i][2] if i < len(runs) and runs[i][0] <= p else 0

    ia, ib = [0], [0]
    out: list = []
    for i in range(len(pts) - 1):
        va, vb = at(a, pts[i], ia), at(b, pts[i], ib)
        if va != vb:
            if out and out[-1][1] == pts[i] and out[-1][2:] == (va, vb):
                out[-1] = (out[-1][0], pts[i + 1], va, vb)
            else:
                out.append((pts[i], pts[i + 1], va, vb))
    return out


# -- checks: each returns findings ---------------------------------------------------------------
def check_refcounts(db) -> list[str]:
    """Each physical run's refcount equals the number of extent records pointing at it."""
    want = _coverage(db.execute("SELECT pblock, nblocks FROM extents").fetchall())
    have = _coverage(db.execute("SELECT pblock, nblocks, refcount FROM refs").fetchall())
    out = []
    for s, e, w, h in _diff(want, have)[:50]:
        if h == 0:
            out.append(f"refcount: physical blocks {s}-{e - 1} are used by {w} extent(s) but not marked in use")
        elif w == 0:
            out.append(f"refcount: physical blocks {s}-{e - 1} have refcount {h} but no extent uses them (leaked)")
        else:
            out.append(f"refcount: physical blocks {s}-{e - 1} have refcount {h}, but {w} extent(s) use them")
    return out


def check_runs_disjoint(db) -> list[str]:
    """Used runs do not overlap each other, free runs do not overlap each other."""
    out = []
    for table in ("refs", "free"):
        prev_end = None
        for s, n in db.execute(f"SELECT pblock, nblocks FROM {table} ORDER BY pblock"):
            if n <= 0:
                out.append(f"{table}: run at physical block {s} has length {n}")
            if prev_end is not None and s < prev_end:
                out.append(f"{table}: runs overlap at physical block {s}")
            prev_end = s + n
    return out


def check_free_vs_used(db) -> list[str]:
    """No block is both free and used; every block below the high-water mark is one of the two."""
    used = _coverage(db.execute("SELECT pblock, nblocks FROM refs").fetchall())
    free = _coverage(db.execute("SELECT pblock, nblocks FROM free").fetchall())
    out = []
    both = _coverage([(s, e - s) for s, e, _ in used] + [(s, e - s) for s, e, _ in free])
    data_blocks = schema.get_meta(db, "data_blocks")
    for s, e, c in both:
        if c > 1:
            out.append(f"space: physical blocks {s}-{e - 1} are both free and in use")
    covered = _coverage([(s, e - s) for s, e, _ in both if s < SEG_BLOCKS])   # segment 0 has a high-water mark
    pos = 0
    for s, e, _ in covered:
        if s > pos:
            out.append(f"space: physical blocks {pos}-{min(s, data_blocks) - 1} are neither free nor in use")
        pos = e
    if pos < data_blocks:
        out.append(f"space: physical blocks {pos}-{data_blocks - 1} are neither free nor in use")
    return out


def check_bounds(db, data_path: str) -> list[str]:
    """No extent, used run or free run lies beyond the data file."""
    data_blocks = schema.get_meta(db, "data_blocks")
    out = []
    file_blocks = os.path.getsize(data_path) // BS if os.path.exists(data_path) else 0
    for ino, lb, pb, n in db.execute("SELECT ino, lblock, pblock, nblocks FROM extents WHERE pblock + nblocks > ? "
                                     "AND pblock < ?", (data_blocks, SEG_BLOCKS)):
        out.append(f"extent: inode {ino} maps logical block {lb} to physical {pb}+{n}, beyond the data file "
                   f"({data_blocks} blocks)")
    for table in ("refs", "free"):
        for s, n in db.execute(f"SELECT pblock, nblocks FROM {table} WHERE pblock + nblocks > ? AND pblock < ?",
                               (data_blocks, SEG_BLOCKS)):
            out.append(f"{table}: run {s}+{n} lies beyond the data file ({data_blocks} blocks)")
    if file_blocks < data_blocks:
        out.append(f"data file: holds {file_blocks} blocks but the metadata uses {data_blocks}")
    return out


def check_extent_maps(db) -> list[str]:
    """Per file: extents sorted and non-overlapping, on regular files, blocks counted.

    Extents past the size are allowed: fallocate with KEEP_SIZE reserves (zeroed) blocks there. What must
    hold is that they read as zeros, which check_data verifies."""
    out = []
    inodes = {ino: (mode, size, blocks) for ino, mode, size, blocks in
              db.execute("SELECT ino, mode, size, blocks FROM inodes")}
    counted: dict[int, int] = {}
    prev: dict[int, int] = {}
    for ino, lb, pb, n in db.execute("SELECT ino, lblock, pblock, nblocks FROM extents ORDER BY ino, lblock"):
        if ino not in inodes:
            out.append(f"extent: inode {ino} does not exist but maps logical block {lb}")
            continue
        mode, size, _ = inodes[ino]
        if not stat.S_ISREG(mode):
            out.append(f"extent: inode {ino} is not a regular file but has extents")
        if n <= 0 or lb < 0 or pb < 0:
            out.append(f"extent: inode {ino} has an invalid extent ({lb}, {pb}, {n})")
        if ino in prev and lb < prev[ino]:
            out.append(f"extent: inode {ino} has overlapping extents at logical block {lb}")
        prev[ino] = lb + n
        counted[ino] = counted.get(ino, 0) + n
    for ino, (_, _, blocks) in inodes.items():
        if counted.get(ino, 0) != blocks:
            out.append(f"inode {ino}: block count {blocks}, but its extents map {counted.get(ino, 0)}")
    return out


def _nlink_mismatches(db) -> list[tuple[int, int, int]]:
    """(ino, nlink, should be) of every linked inode whose nlink is not its number of entries
    (directories: 2 + subdirectories)."""
    entries = dict(db.execute("SELECT ino, COUNT(*) FROM dirents GROUP BY ino"))
    subdirs = dict(db.execute("SELECT d.parent, COUNT(*) FROM dirents d JOIN inodes i ON i.ino = d.ino "
                              "WHERE (i.mode & 61440) = 16384 GROUP BY d.parent"))
    out = []
    for ino, mode, nlink in db.execute("SELECT ino, mode, nlink FROM inodes WHERE nlink > 0"):
        want = 2 + subdirs.get(ino, 0) if stat.S_ISDIR(mode) else entries.get(ino, 0)
        if nlink != want:
            out.append((ino, nlink, want))
    return out


def check_nlink(db) -> list[str]:
    """nlink equals the number of entries (directories: 2 + subdirectories)."""
    return [f"inode {ino}: nlink is {nlink}, should be {want}" for ino, nlink, want in _nlink_mismatches(db)]


def check_tree(db) -> list[str]:
    """No orphan inodes; entries point at existing inodes inside directories; directories have one entry."""
    out = []
    for (ino,) in db.execute("SELECT ino FROM inodes WHERE nlink = 0"):
        out.append(f"orphan: inode {ino} was unlinked while open and is still allocated (freed at next mount)")
    for (ino,) in db.execute("SELECT i.ino FROM inodes i WHERE i.nlink > 0 AND i.ino != ? AND NOT EXISTS "
                             "(SELECT 1 FROM dirents d WHERE d.ino = i.ino)", (ROOT_INO,)):
        out.append(f"orphan: inode {ino} has no directory entry")
    for parent, name, ino in db.execute("SELECT d.parent, d.name, d.ino FROM dirents d WHERE NOT EXISTS "
                                        "(SELECT 1 FROM inodes i WHERE i.ino = d.ino)"):
        out.append(f"entry: {name!r} in directory {parent} points at missing inode {ino}")
    # entries under STAGING_PARENT are an unfinished tree clone's staging tree: consistent, unreachable,
    # and freed at the next mount (core/treeclone.py)
    for parent, name in db.execute("SELECT d.parent, d.name FROM dirents d LEFT JOIN inodes p ON p.ino = d.parent "
                                   "WHERE (p.ino IS NULL AND d.parent != ?) OR (p.mode & 61440) != 16384",
                                   (STAGING_PARENT,)):
        out.append(f"entry: {name!r} is in inode {parent}, which is not a directory")
    for (ino,) in db.execute("SELECT d.ino FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE "
                             "(i.mode & 61440) = 16384 GROUP BY d.ino HAVING COUNT(*) > 1"):
        out.append(f"entry: directory inode {ino} has more than one entry")
    if db.execute("SELECT 1 FROM inodes WHERE ino=? AND (mode & 61440) = 16384", (ROOT_INO,)).fetchone() is None:
        out.append("root: the root directory is missing")
    return out


def check_csums_present(db) -> list[str]:
    """Checksum runs are well formed and disjoint, every used block has a checksum, and no free block
    keeps one."""
    out = []
    used = _coverage(db.execute("SELECT pblock, nblocks FROM refs").fetchall())
    runs = db.execute("SELECT pblock, nblocks, length(sums) FROM csums ORDER BY pblock").fetchall()
    end = 0
    for p, n, size in runs:
        if n <= 0 or size != 8 * n:
            out.append(f"checksum: the run at physical block {p} is malformed ({n} blocks, {size} bytes of sums)")
        elif p < end:
            out.append(f"checksum: the runs at physical blocks before {p} and at {p} overlap")
        end = max(end, p + n)
    have = _coverage([(p, n) for p, n, _ in runs if n > 0])
    for s, e, u, h in _diff([(s, e, 1) for s, e, _ in used], [(s, e, 1) for s, e, _ in have])[:50]:
        if u and not h:
            out.append(f"checksum: used physical blocks {s}-{e - 1} have no checksum")
        else:
            out.append(f"checksum: free physical blocks {s}-{e - 1} still have checksums")
    return out


def check_data(db, data_path: str, progress=None) -> list[str]:
    """--verify-data: every used block's bytes match its checksum. `progress` (a progress.Progress) is
    told the bytes to read, then each run read."""
    out = []
    owners = db.execute("SELECT ino, lblock, pblock, nblocks FROM extents ORDER BY pblock").fetchall()
    runs = db.execute("SELECT pblock, nblocks FROM refs ORDER BY pblock").fetchall()
    if progress is not None:
        progress.total = sum(n for _, n in runs) * BS
    with _Blocks(data_path) as f:
        for s, n in runs:
            if progress is not None:
                progress.advance(n * BS)
            sums = read_csums(db, s, n)
            for i in range(n):
                p = s + i
                blk = f.read(p)
                if sums[i] is not None and xxhash.xxh3_64_intdigest(blk) != sums[i]:
                    who = [f"inode {ino} offset {(lb + p - pb) * BS}" for ino, lb, pb, m in owners if pb <= p < pb + m]
                    out.append(f"data: physical block {p} does not match its checksum ({', '.join(who) or 'unowned'})")
        # bytes past a file's size are zero, so growing the file never exposes old data
        for ino, size, lb, pb, n in db.execute(
                "SELECT e.ino, i.size, e.lblock, e.pblock, e.nblocks FROM extents e JOIN inodes i ON i.ino = e.ino "
                "WHERE (e.lblock + e.nblocks) * ? > i.size", (BS,)).fetchall():
            for i in range(max(0, size // BS - lb), n):
                blk = f.read(pb + i)
                skip = max(0, size - (lb + i) * BS)
                if blk[skip:].strip(b"\0"):
                    out.append(f"data: inode {ino} has non-zero bytes past its size {size} "
                               f"(logical block {lb + i}, physical {pb + i})")
    return out


def check_acls(db) -> list[str]:
    """POSIX ACLs parse; a default ACL is on a directory; an access ACL says more than the mode and agrees
    with its permission bits (see core/acl.py)."""
    out = []
    for ino, name, value, mode in db.execute("SELECT x.ino, x.name, x.value, i.mode FROM xattrs x JOIN inodes i "
                                             "ON i.ino = x.ino WHERE x.name IN (?, ?)", acl.NAMES):
        what = name.decode() if isinstance(name, bytes) else name
        try:
            entries = acl.parse(value)
        except FsError as e:
            out.append(f"acl: inode {ino} has a malformed {what} ({e.message})")
            continue
        if name == acl.DEFAULT and not stat.S_ISDIR(mode):
            out.append(f"acl: inode {ino} is not a directory but has a default ACL")
        elif name == acl.ACCESS and (acl.is_minimal(entries) or acl.mode_bits(entries) != mode & 0o777):
            out.append(f"acl: inode {ino}: mode {mode & 0o777:o} and access ACL "
                       f"({acl.mode_bits(entries):o}{', minimal' if acl.is_minimal(entries) else ''}) disagree")
    return out


def check_segments(db, data_path: str) -> list[str]:
    """Segments other than 0: each one listed has its file, each file in the folder is listed, numbers
    are below next_seg, a file's own segment exists, and every physical block a table names lies in
    segment 0 or in a listed segment, inside the size it is kept at. Free runs are in segment 0 only.
    Each segment file is as long as its size says, and holds no data outside the used runs (freed blocks
    are punched out). A segment is the own segment of at most one file; that file maps blocks of it only
    at their own logical positions (its identity claim), and no other file maps blocks of it (a shared
    segment is frozen: nobody's own)."""
    out = []
    next_seg = schema.get_meta(db, "next_seg")
    segs = dict(db.execute("SELECT seg, size_bytes FROM segments"))
    folder = os.path.join(os.path.dirname(data_path), schema.SEGS_NAME)
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    for seg, size in sorted(segs.items()):
        if seg <= 0 or seg >= next_seg:
            out.append(f"segment {seg}: number outside 1..{next_seg - 1}")
        if str(seg) not in names:
            out.append(f"segment {seg}: its file {schema.SEGS_NAME}/{seg} is missing")
        if size < 0 or size > SEG_BLOCKS * BS:
            out.append(f"segment {seg}: invalid size {size}")
    for name in sorted(names - {str(seg) for seg in segs}):
        out.append(f"segment file {schema.SEGS_NAME}/{name}: no such segment in the metadata (the next mount "
                   f"deletes it)")
    owner: dict[int, int] = {}
    for ino, seg in db.execute("SELECT ino, own_seg FROM inodes WHERE own_seg != 0"):
        if seg not in segs:
            out.append(f"inode {ino}: its own segment {seg} does not exist")
        if seg in owner:
            out.append(f"segment {seg}: own segment of both inode {owner[seg]} and inode {ino}")
        owner.setdefault(seg, ino)
    for ino, lb, pb, n in db.execute("SELECT ino, lblock, pblock, nblocks FROM extents WHERE pblock >= ?",
                                     (SEG_BLOCKS,)):
        seg = locate(pb)[0]
        if seg not in owner:
            continue
        if owner[seg] != ino:
            out.append(f"segment {seg}: own segment of inode {owner[seg]}, but inode {ino} maps block "
                       f"{pb - seg_base(seg)} of it (a shared segment must be nobody's own)")
        elif pb != seg_base(seg) + lb:
            out.append(f"inode {ino}: logical block {lb} is at block {pb - seg_base(seg)} of its own segment {seg}")
    used = _coverage(db.execute("SELECT pblock, nblocks FROM refs WHERE pblock >= ?", (SEG_BLOCKS,)).fetchall())
    for seg, size in sorted(segs.items()):
        if str(seg) not in names:
            continue
        fd = os.open(segment_path(data_path, seg), os.O_RDONLY | os.O_CLOEXEC)
        try:
            have, ranges = file_layout(fd)
        finally:
            os.close(fd)
        if have != size:
            out.append(f"segment {seg}: its file is {have} bytes, the metadata says {size} (the next mount sets "
                       f"its size)")
        base = seg_base(seg)
        seg_used = [(s - base, e - s) for s, e, _ in used if base <= s < base + SEG_BLOCKS]
        for s, e, u, h in _diff([(s, s + n, 1) for s, n in seg_used], [(s, e, 1) for s, e in ranges])[:20]:
            if h and not u:
                out.append(f"segment {seg}: blocks {s}-{e - 1} hold data but no file uses them (not punched; "
                           f"the next mount punches them)")
    for table in ("extents", "refs", "csums", "free"):
        for s, n in db.execute(f"SELECT pblock, nblocks FROM {table} WHERE pblock >= ?", (SEG_BLOCKS,)):
            seg = locate(s)[0]
            if table == "free":
                out.append(f"free: run {s}+{n} lies in segment {seg}; free runs are in segment 0 only")
            elif seg not in segs:
                out.append(f"{table}: run {s}+{n} lies in segment {seg}, which does not exist")
            elif s + n > seg_base(seg) + -(-segs[seg] // BS):
                out.append(f"{table}: run {s}+{n} reaches past the size of segment {seg} ({segs[seg]} bytes)")
    return out


CHECKS = [check_runs_disjoint, check_free_vs_used, check_refcounts, check_extent_maps, check_nlink,
          check_tree, check_csums_present, check_acls]


def run_checks(db, data_path: str, verify_data: bool = False, progress=None) -> list[str]:
    findings = []
    for check in CHECKS:
        findings += check(db)
    findings += check_bounds(db, data_path)
    findings += check_segments(db, data_path)
    if verify_data:
        findings += check_data(db, data_path, progress)
    return findings


# -- repair --------------------------------------------------------------------------------------
def repair(db, data_path: str) -> tuple[list[str], list[str]]:
    """Fix what can be derived from the extent maps; return (repaired, unrepairable)."""
    done, cannot = [], []
    data_blocks = schema.get_meta(db, "data_blocks")
    db.execute("BEGIN IMMEDIATE")
    # entries and extents that point at nothing
    n = db.execute("DELETE FROM dirents WHERE ino NOT IN (SELECT ino FROM inodes)").rowcount
    if n:
        done.append(f"removed {n} directory entries pointing at missing inodes")
    n = db.execute("DELETE FROM extents WHERE ino NOT IN (SELECT ino FROM inodes WHERE (mode & 61440) = 32768)").rowcount
    if n:
        done.append(f"removed {n} extents of missing or non-regular inodes")
    for ino, lb, pb, m in db.execute("SELECT ino, lblock, pblock, nblocks FROM extents WHERE pblock + nblocks > ? "
                                     "AND pblock < ?", (data_blocks, SEG_BLOCKS)).fetchall():
        db.execute("DELETE FROM extents WHERE ino=? AND lblock=?", (ino, lb))
        cannot.append(f"inode {ino}: data at byte offset {lb * BS} (+{m * BS}) pointed beyond the data file "
                      f"and is lost; that range is now a hole")
    # orphans: unlinked-while-open inodes are freed; unreachable linked ones go to /lost+found
    orphans = [r[0] for r in db.execute("SELECT ino FROM inodes WHERE nlink = 0")]
    for ino in orphans:
        db.execute("DELETE FROM extents WHERE ino=?", (ino,))
        db.execute("DELETE FROM xattrs WHERE ino=?", (ino,))
        db.execute("DELETE FROM inodes WHERE ino=?", (ino,))
    if orphans:
        done.append(f"freed {len(orphans)} unlinked inode(s)")
    lost = db.execute("SELECT i.ino FROM inodes i WHERE i.ino != ? AND NOT EXISTS "
                      "(SELECT 1 FROM dirents d WHERE d.ino = i.ino)", (ROOT_INO,)).fetchall()
    if lost:
        lf = db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (ROOT_INO, b"lost+found")).fetchone()
        if lf is None:
            import time
            now = time.time_ns()
            lf_ino = db.execute("INSERT INTO inodes(mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                                "VALUES (?, 0, 0, 2, ?, ?, ?)", (0o40700, now, now, now)).lastrowid
            db.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (ROOT_INO, b"lost+found", lf_ino))
        else:
            lf_ino = lf[0]
        for (ino,) in lost:
            db.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (lf_ino, f"#{ino}".encode(), ino))
        done.append(f"moved {len(lost)} unreachable inode(s) to /lost+found")
    # derived state: block counts, refcounts, free space, nlink
    db.execute("UPDATE inodes SET blocks = COALESCE((SELECT SUM(nblocks) FROM extents e WHERE e.ino = inodes.ino), 0)")
    want = _coverage(db.execute("SELECT pblock, nblocks FROM extents").fetchall())
    have = _coverage(db.execute("SELECT pblock, nblocks, refcount FROM refs").fetchall())
    if _diff(want, have) or check_runs_disjoint(db) or check_free_vs_used(db):
        db.execute("DELETE FROM refs")
        db.executemany("INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, ?, ?)",
                       [(s, e - s, c) for s, e, c in want])
        db.execute("DELETE FROM free")
        pos = 0
        for s, e, _ in _coverage([(s, e - s) for s, e, _ in want if s < SEG_BLOCKS]):   # free runs: segment 0
            if s > pos:
                db.execute("INSERT INTO free(pblock, nblocks) VALUES (?, ?)", (pos, s - pos))
            pos = e
        if pos < data_blocks:
            db.execute("INSERT INTO free(pblock, nblocks) VALUES (?, ?)", (pos, data_blocks - pos))
        done.append("rebuilt refcounts and free space from the extent maps")
    n = _drop_csums_outside(db, _coverage(db.execute("SELECT pblock, nblocks FROM refs").fetchall()), data_path)
    if n:
        done.append(f"dropped {n} checksums of free blocks or of blocks two runs claimed")
    # orphans (nlink 0) were freed above, so every inode left is checked
    fixed = _nlink_mismatches(db)
    db.executemany("UPDATE inodes SET nlink=? WHERE ino=?", [(want, ino) for ino, _, want in fixed])
    if fixed:
        done.append(f"corrected nlink of {len(fixed)} inode(s)")
    db.execute("COMMIT")
    for f in check_csums_present(db):
        if "no checksum" in f:
            cannot.append(f + " (their contents cannot be verified; reading them gives EIO)")
    return done, cannot


def _drop_csums_outside(db, used, data_path: str) -> int:
    """Rebuild the checksum runs as well-formed, disjoint runs over used blocks only (`used`: sorted,
    disjoint (start, end, _)); return how many block checksums were dropped. A block that two runs claim
    keeps the sum that matches its bytes in the data file, or none if neither does."""
    runs = []
    total = 0
    for p, n, blob in db.execute("SELECT pblock, nblocks, sums FROM csums ORDER BY pblock").fetchall():
        total += max(n, 0)
        runs.append((p, unpack_sums(blob[:8 * n]) if n > 0 else []))
    if any(p < q + len(s) for (q, s), (p, _) in zip(runs, runs[1:])):
        claims: dict[int, list[int]] = {}
        for p, sums in runs:
            for i, v in enumerate(sums):
                claims.setdefault(p + i, []).append(v)
        runs = []
        with _Blocks(data_path) as f:
            for q in sorted(claims):
                vs = claims[q]
                if len(vs) > 1:
                    h = xxhash.xxh3_64_intdigest(f.read(q))
                    vs = [h] if h in vs else []
                if not vs:
                    continue
                if runs and runs[-1][0] + len(runs[-1][1]) == q:
                    runs[-1][1].append(vs[0])
                else:
                    runs.append((q, [vs[0]]))
    ends = [e for _, e, _ in used]
    keep = []
    for p, sums in runs:
        k = bisect.bisect_right(ends, p)
        while k < len(used) and used[k][0] < p + len(sums):
            a, b = max(used[k][0], p), min(used[k][1], p + len(sums))
            keep.append((a, b - a, pack_sums(sums[a - p:b - p])))
            k += 1
    dropped = total - sum(n for _, n, _ in keep)
    if dropped:
        db.execute("DELETE FROM csums")
        db.executemany("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)", keep)
    return dropped


def fsck(store: str, repair_: bool = False, verify_data: bool = False, progress=None) -> Report:
    """Check (and optionally repair) a store that is not mounted. Raises StoreError if unusable."""
    import fcntl
    db = schema.open_store_db(store, thorough=True)
    lock_fd = os.open(os.path.join(store, schema.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from .errors import StoreError
            raise StoreError(f"{store}: store is in use (mounted?); unmount it before fsck") from None
        return fsck_db(db, os.path.join(store, schema.DATA_NAME), repair_, verify_data, progress)
    finally:
        os.close(lock_fd)
        db.close()


def fsck_db(db: sqlite3.Connection, data_path: str, repair_: bool = False, verify_data: bool = False,
            progress=None) -> Report:
    rep = Report(findings=run_checks(db, data_path, verify_data, progress))
    if repair_ and rep.findings:
        rep.repaired, rep.unrepairable = repair(db, data_path)
        known = " ".join(rep.unrepairable)
        rep.unrepairable += [f for f in run_checks(db, data_path, verify_data) if f not in known]
    return rep
