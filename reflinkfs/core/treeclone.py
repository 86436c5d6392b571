"""Clone a whole subtree inside the store: `reflinkfs clone -r` as one request.

Guarantees:
- DST appears at once or not at all. The copy is built under a staging entry that no lookup can reach
  (a directory entry whose parent is STAGING_PARENT, inode 0, which never exists) and is published by one
  UPDATE of that entry, in one operation (`publish`). A crash at any moment leaves either no DST (the
  staging tree, if any was committed, is freed at the next mount by `purge_staging`) or the whole DST.
- The staging tree is always a consistent tree (nlink = its entries, directories 2 + subdirectories,
  every extent referenced), so fsck is clean whenever a commit catches it half built; fsck does not count
  staging entries as misplaced.
- Set-based: each step copies a batch of up to `batch` directory entries with a fixed number of
  statements (inodes, entries, xattrs with ACLs, extents), and adds the references of the batch's
  extents with one `Space.adjust` (a few statements per span of physical blocks, never per block).
  Hard links inside SRC stay hard links (a source inode maps to one new inode, kept in a temporary
  table); nlink counts only the names inside DST.
- Refusals change nothing: DST exists, DST inside SRC, SRC not a directory, an entry of SRC the caller
  may not read (checked as `cp -r` would need: read and search on directories, read on files, search on
  SRC's ancestors; a device node when the caller is not root), all found by `scan` before anything is
  built.

Concurrency: the volume is single-threaded; each step is one `_op` run to completion. Between steps the
caller (the FUSE adapter) serves other requests, so the mount keeps answering, and the periodic commit
may commit a half-built staging tree (harmless, see above). The price: a file of SRC changed *while* the
clone runs is cloned as it was when its batch ran (each file is always copied whole, from one instant);
data written before the request, committed or not, is in the clone (one connection sees its own open
transaction). Only one tree clone runs at a time per volume (its temporary tables are per connection);
the adapter serialises them.

Memory: the queue of directories still to visit and the old -> new inode map live in SQLite temporary
tables, not in Python; a step holds one batch of rows. What grows per entry is the temporary tables.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE, ROOT_INO
from . import acl
from .datafile import SEG_SHIFT

STAGING_PARENT = 0              # no inode has this number: entries under it are unreachable
STAGING_PREFIX = b".reflinkfs-tree-clone-"
BATCH = 2000                    # entries of a phase's first step
BATCH_MIN, BATCH_MAX = 64, 32768
STEP_SECONDS = 0.015            # what a step aims to take: how long the mount's other requests may wait


@dataclass(frozen=True)
class Cred:
    """Who asks: the filesystem uid, gid and supplementary groups (None: trusted, no checks)."""
    uid: int
    gid: int
    groups: frozenset = frozenset()

    @property
    def root(self) -> bool:
        return self.uid == 0

    @classmethod
    def of_pid(cls, pid: int) -> "Cred":
        """The credentials of a running process, from /proc (FUSE passes setxattr only the pid)."""
        uid = gid = None
        groups: frozenset = frozenset()
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Uid":
                        uid = int(rest.split()[3])        # the filesystem uid
                    elif key == "Gid":
                        gid = int(rest.split()[3])
                    elif key == "Groups":
                        groups = frozenset(int(g) for g in rest.split())
        except OSError:
            pass
        if uid is None or gid is None:
            raise FsError(errno.EPERM, f"cannot find the credentials of process {pid}")
        return cls(uid, gid, groups | {gid})


def may(cred: Cred | None, mode: int, uid: int, gid: int, acl_value: bytes | None, want: int) -> bool:
    """POSIX permission check (want: rwx bits, 4/2/1), with the access ACL when there is one; root may
    read and search anything (CAP_DAC_READ_SEARCH)."""
    if cred is None or cred.root:
        return True
    if acl_value:
        entries = acl.parse(acl_value)
        mask = next((p for t, p, _ in entries if t == acl.MASK), 7)
        if uid == cred.uid:
            return _grants(next(p for t, p, _ in entries if t == acl.USER_OBJ), want)
        for t, p, i in entries:
            if t == acl.USER and i == cred.uid:
                return _grants(p & mask, want)
        matched = False
        for t, p, i in entries:
            if (t == acl.GROUP_OBJ and gid in cred.groups) or (t == acl.GROUP and i in cred.groups):
                matched = True
                if _grants(p & mask, want):
                    return True
        if matched:
            return False
        return _grants(next(p for t, p, _ in entries if t == acl.OTHER), want)
    if uid == cred.uid:
        bits = mode >> 6
    elif gid in cred.groups:
        bits = mode >> 3
    else:
        bits = mode
    return _grants(bits & 7, want)


class Refusal(FsError):
    """A refusal that names the entry of SRC: `path`, relative to SRC (b"." for SRC itself)."""

    def __init__(self, err: int, message: str, path: bytes):
        super().__init__(err, f"{message}: {os.fsdecode(path)}")
        self.path = path


def refused(err: int, message: str, path: bytes) -> Refusal:
    return Refusal(err, message, path)


def _grants(perm: int, want: int) -> bool:
    return perm & want == want


@dataclass
class TreeProgress:
    entries_total: int = 0          # entries under SRC (SRC itself not counted)
    entries_done: int = 0
    bytes_shared: int = 0           # mapped bytes of the new files (hard-linked files once)
    phase: str = "scan"             # scan | copy | publish | done | failed
    started: float = field(default_factory=time.monotonic)


class TreeClone:
    """One `clone -r` of directory `src` to (`dst_parent`, `dst_name`) on `vol`.

    Drive it with `step()` until it returns False, then `publish()`; or call `abort()` on any error
    (it frees what was built). `run()` does all of it at once (tests, tools)."""

    def __init__(self, vol, src: int, dst_parent: int, dst_name: bytes, cred: Cred | None = None,
                 batch: int | None = None):
        self.vol = vol
        self.db = vol.db
        self.src, self.dst_parent, self.dst_name = src, dst_parent, dst_name
        self.cred = cred
        self.adaptive = batch is None       # else every step takes `batch` entries (tests)
        self.batch = BATCH if batch is None else batch
        self._batches = {"scan": self.batch, "copy": self.batch}
        self.progress = TreeProgress()
        self.staging_name = STAGING_PREFIX + b"%d-%d" % (os.getpid(), time.monotonic_ns())
        self._staged_root: int | None = None
        self._check_request()
        self._make_tables()

    # -- checks --------------------------------------------------------------------------------
    def _check_request(self) -> None:
        from .volume import _check_name
        _check_name(self.dst_name)
        s = self.vol.getattr(self.src)
        if not stat.S_ISDIR(s.mode):
            raise FsError(errno.ENOTDIR, "the source is not a directory")
        p = self.vol.getattr(self.dst_parent)
        if not stat.S_ISDIR(p.mode):
            raise FsError(errno.ENOTDIR, "the destination's parent is not a directory")
        if p.nlink == 0:
            raise FsError(errno.ENOENT, "the destination's directory was removed")
        if self.vol.is_ancestor(self.src, self.dst_parent):
            raise FsError(errno.EINVAL, "the destination is inside the source")
        if self.vol.child(self.dst_parent, self.dst_name) is not None:
            raise FsError(errno.EEXIST, "the destination exists")
        if not may(self.cred, p.mode, p.uid, p.gid, self._acl(self.dst_parent), 3):
            raise FsError(errno.EACCES, "no write permission in the destination's directory")
        # SRC is reached through its ancestors: each needs search permission, as path lookup checks
        ino = self.src
        while ino != ROOT_INO:
            row = self.db.execute("SELECT parent FROM dirents WHERE ino=? LIMIT 1", (ino,)).fetchone()
            if row is None:
                raise FsError(errno.ENOENT, "the source is not in the tree")
            ino = row[0]
            a = self.vol.getattr(ino)
            if not may(self.cred, a.mode, a.uid, a.gid, self._acl(ino), 1):
                raise FsError(errno.EACCES, "no search permission on a directory above the source")
        if not may(self.cred, s.mode, s.uid, s.gid, self._acl(self.src), 5):
            raise refused(errno.EACCES, "cannot read the source directory", b".")

    def _acl(self, ino: int) -> bytes | None:
        row = self.db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, acl.ACCESS)).fetchone()
        return row[0] if row else None

    # -- temporary tables ----------------------------------------------------------------------
    # tc_queue  directories still to visit: (old dir, new dir or NULL while scanning, last name taken);
    #           paged by name, so each page is one range of the dirents (parent, name) index
    # tc_batch  the entries of this step, in the order taken: (old parent, new parent, name, old inode,
    #           new inode when an earlier step already made it: a hard link)
    # tc_new    the inodes this step creates: old -> new, how many of the step's entries name it, whether
    #           it is a directory, whether other names of it may come later (nlink > 1)
    # tc_map    old -> new for hard-linked inodes already made (only those: a file with one name, or a
    #           directory, is met once)
    _TABLES = ("tc_queue", "tc_batch", "tc_new", "tc_map")

    def _make_tables(self) -> None:
        ex = self.db.execute
        self._drop_tables()
        ex("CREATE TEMP TABLE tc_queue(seq INTEGER PRIMARY KEY, old INTEGER, new INTEGER, after BLOB)")
        ex("CREATE TEMP TABLE tc_batch(seq INTEGER PRIMARY KEY, old_parent INTEGER, new_parent INTEGER, name BLOB, "
           "old INTEGER, new INTEGER)")
        ex("CREATE TEMP TABLE tc_new(old INTEGER PRIMARY KEY, new INTEGER, names INTEGER, dir INTEGER, "
           "linked INTEGER)")
        ex("CREATE TEMP TABLE tc_map(old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        ex("INSERT INTO tc_queue(old, new, after) VALUES (?, NULL, x'')", (self.src,))
        self._mapped = 0            # rows in tc_map: while 0, no entry can be a later name of a made inode

    def _drop_tables(self) -> None:
        for t in self._TABLES:
            self.db.execute(f"DROP TABLE IF EXISTS temp.{t}")

    def _take_batch(self) -> int:
        """Move up to `batch` entries from the front of the queue into tc_batch; returns how many."""
        ex = self.db.execute
        ex("DELETE FROM tc_batch")
        left = self.batch
        while left > 0:
            row = ex("SELECT seq, old, new, after FROM tc_queue ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            seq, old, new, after = row
            n = ex("INSERT INTO tc_batch(old_parent, new_parent, name, old) SELECT parent, ?, name, ino FROM dirents "
                   "WHERE parent=? AND name>? ORDER BY name LIMIT ?", (new, old, after, left)).rowcount
            if n < left:
                ex("DELETE FROM tc_queue WHERE seq=?", (seq,))
            else:
                ex("UPDATE tc_queue SET after=(SELECT name FROM tc_batch ORDER BY seq DESC LIMIT 1) WHERE seq=?",
                   (seq,))
            left -= n
        return self.batch - left

    def _queue_directories(self, table: str) -> None:
        """Queue the directories among `table`'s entries (tc_batch while scanning, tc_new while copying)."""
        if table == "tc_batch":
            self.db.execute("INSERT INTO tc_queue(old, new, after) SELECT b.old, NULL, x'' FROM tc_batch b "
                            "CROSS JOIN inodes i ON i.ino = b.old WHERE (i.mode & 61440) = 16384 ORDER BY b.seq")
        else:
            self.db.execute("INSERT INTO tc_queue(old, new, after) SELECT old, new, x'' FROM tc_new WHERE dir "
                            "ORDER BY old")

    def _path(self, name: bytes, parent: int) -> bytes:
        """The path, relative to SRC, of entry `name` of directory `parent` (for messages)."""
        parts = [name]
        while parent != self.src:
            row = self.db.execute("SELECT parent, name FROM dirents WHERE ino=? LIMIT 1", (parent,)).fetchone()
            if row is None:
                break
            parent = row[0]
            parts.append(row[1])
        return b"/".join(reversed(parts))

    # -- phase 1: scan (count, check permissions) ----------------------------------------------
    def _scan_step(self) -> bool:
        n = self._take_batch()
        if not n:
            return False
        self.progress.entries_total += n
        cred = self.cred
        if cred is not None and not cred.root:
            for parent, name, mode, uid, gid, acl_value in self.db.execute(
                    "SELECT b.old_parent, b.name, i.mode, i.uid, i.gid, x.value FROM tc_batch b "
                    "CROSS JOIN inodes i ON i.ino = b.old LEFT JOIN xattrs x ON x.ino = i.ino AND x.name = ? "
                    "ORDER BY b.seq", (acl.ACCESS,)).fetchall():
                if stat.S_ISDIR(mode):
                    if not may(cred, mode, uid, gid, acl_value, 5):
                        raise refused(errno.EACCES, "cannot read a directory of the source", self._path(name, parent))
                elif stat.S_ISREG(mode):
                    if not may(cred, mode, uid, gid, acl_value, 4):
                        raise refused(errno.EACCES, "cannot read a file of the source", self._path(name, parent))
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    raise refused(errno.EPERM, "only root may clone a device node", self._path(name, parent))
        self._queue_directories("tc_batch")
        return True

    # -- phase 2: copy, one batch per step ------------------------------------------------------
    def _start_copy(self) -> None:
        """Create the staging root, a copy of SRC's directory inode, and queue SRC again for the copy."""
        ex = self.db.execute
        self.progress.phase = "copy"
        ex("DELETE FROM tc_queue")
        with self.vol.operation():
            ex("DELETE FROM tc_batch")
            ex("INSERT INTO tc_batch(new_parent, name, old) VALUES (NULL, NULL, ?)", (self.src,))
            new = self._copy_inodes()
            ex("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (STAGING_PARENT, self.staging_name, new))
        self._staged_root = new
        ex("INSERT INTO tc_queue(old, new, after) VALUES (?, ?, x'')", (self.src, new))

    def _copy_inodes(self) -> int:
        """New inodes for tc_batch's entries that have none yet (into tc_new): attributes, xattrs and
        extents copied, references added, segments shared frozen. Returns the first new inode number."""
        ex = self.db.execute
        if self._mapped:            # later names of hard-linked inodes made by an earlier step
            ex("UPDATE tc_batch SET new = m.new FROM tc_map m WHERE m.old = tc_batch.old")
        base = ex("SELECT COALESCE(MAX(ino), 0) + 1 FROM inodes").fetchone()[0]
        ex("DELETE FROM tc_new")
        n = ex("INSERT INTO tc_new(old, new, names, dir, linked) "
               "SELECT b.old, ? + ROW_NUMBER() OVER (ORDER BY b.old) - 1, COUNT(*), (i.mode & 61440) = 16384, "
               "(i.mode & 61440) != 16384 AND i.nlink > 1 "
               "FROM tc_batch b CROSS JOIN inodes i ON i.ino = b.old WHERE b.new IS NULL GROUP BY b.old",
               (base,)).rowcount
        if n <= 0:
            return base
        now = time.time_ns()
        cred = self.cred
        keep_owner = cred is None or cred.root
        # directories start at nlink 2 (their subdirectories add theirs as they are made), others at the
        # number of their names made so far
        ex("INSERT INTO inodes(ino, mode, uid, gid, nlink, size, blocks, rdev, atime_ns, mtime_ns, ctime_ns, target) "
           "SELECT n.new, CASE WHEN ? OR n.dir THEN i.mode ELSE i.mode & ~3072 END, "
           "CASE WHEN ? THEN i.uid ELSE ? END, CASE WHEN ? THEN i.gid ELSE ? END, "
           "CASE WHEN n.dir THEN 2 ELSE n.names END, i.size, i.blocks, i.rdev, i.atime_ns, "
           "i.mtime_ns, ?, i.target FROM tc_new n CROSS JOIN inodes i ON i.ino = n.old",
           (keep_owner, keep_owner, cred.uid if cred is not None else 0, keep_owner,
            cred.gid if cred is not None else 0, now))
        self.vol.inodes_added(n)
        ex("INSERT INTO xattrs(ino, name, value) SELECT n.new, x.name, x.value FROM tc_new n "
           "CROSS JOIN xattrs x ON x.ino = n.old")
        ex("INSERT INTO extents(ino, lblock, pblock, nblocks) SELECT n.new, e.lblock, e.pblock, e.nblocks "
           "FROM tc_new n CROSS JOIN extents e ON e.ino = n.old")
        runs = ex("SELECT pblock, nblocks FROM extents WHERE ino >= ?", (base,)).fetchall()
        if runs:
            # a source whose blocks lie in its own segment loses it: a shared segment is frozen
            ex("UPDATE inodes SET own_seg=0 WHERE ino IN (SELECT old FROM tc_new) AND +own_seg != 0 "
               "AND EXISTS (SELECT 1 FROM extents e WHERE e.ino = inodes.ino AND e.pblock >= (inodes.own_seg << ?) "
               "AND e.pblock < ((inodes.own_seg + 1) << ?))", (SEG_SHIFT, SEG_SHIFT))
            self.vol.space.adjust(runs, +1)
            self.progress.bytes_shared += sum(nb for _, nb in runs) * BLOCK_SIZE
        self._mapped += ex("INSERT INTO tc_map(old, new) SELECT old, new FROM tc_new WHERE linked").rowcount
        return base

    def _copy_step(self) -> bool:
        taken = self._take_batch()
        if not taken:
            return False
        ex = self.db.execute
        with self.vol.operation():
            self._copy_inodes()
            ex("INSERT INTO dirents(parent, name, ino) SELECT b.new_parent, b.name, COALESCE(b.new, n.new) "
               "FROM tc_batch b LEFT JOIN tc_new n ON n.old = b.old ORDER BY b.seq")
            if self._mapped:        # inodes made earlier got more names
                ex("UPDATE inodes SET nlink = nlink + c.k FROM (SELECT new, COUNT(*) AS k FROM tc_batch "
                   "WHERE new IS NOT NULL GROUP BY new) AS c WHERE inodes.ino = c.new")
            # each new subdirectory adds one to its parent's nlink
            ex("UPDATE inodes SET nlink = nlink + c.k FROM (SELECT b.new_parent AS p, COUNT(*) AS k FROM tc_batch b "
               "CROSS JOIN tc_new n ON n.old = b.old WHERE n.dir GROUP BY b.new_parent) AS c WHERE inodes.ino = c.p")
            self._queue_directories("tc_new")
        self.progress.entries_done += taken
        return True

    # -- driving -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Do one batch; False when the tree is built and only `publish` is left. The batch adapts, per
        phase, so that a step takes about STEP_SECONDS: entries differ in cost (a file of many extents
        costs more than an empty one), and a step is as long as the mount makes other requests wait."""
        phase = self.progress.phase
        self.batch = self._batches.get(phase, self.batch)
        started = time.perf_counter()
        try:
            return self._step()
        finally:
            if self.adaptive and phase in self._batches:
                took = max(time.perf_counter() - started, 1e-4)
                scale = min(2.0, max(0.5, STEP_SECONDS / took))     # damped: one odd step moves it little
                self._batches[phase] = min(BATCH_MAX, max(BATCH_MIN, int(self.batch * scale)))

    def _step(self) -> bool:
        if self.progress.phase == "scan":
            if self._scan_step():
                return True
            self._start_copy()
            return True
        if self.progress.phase == "copy":
            if self._copy_step():
                return True
            self.progress.phase = "publish"
        return False

    def publish(self):
        """Give the staging tree its name: one UPDATE. Refuses (and frees it) if DST appeared meanwhile."""
        try:
            with self.vol.operation():
                p = self.vol.getattr(self.dst_parent)
                if not stat.S_ISDIR(p.mode) or p.nlink == 0:
                    raise FsError(errno.ENOENT, "the destination's directory was removed")
                if self.vol.child(self.dst_parent, self.dst_name) is not None:
                    raise FsError(errno.EEXIST, "the destination exists")
                if self.vol.is_ancestor(self.src, self.dst_parent):
                    raise FsError(errno.EINVAL, "the destination is inside the source")
                self.db.execute("UPDATE dirents SET parent=?, name=? WHERE parent=? AND name=?",
                                (self.dst_parent, self.dst_name, STAGING_PARENT, self.staging_name))
                self.db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (self.dst_parent,))
                self.vol.touch(self.dst_parent)
                a = self.vol.getattr(self._staged_root)
        except BaseException:
            self.abort()
            raise
        self._drop_tables()
        self.progress.phase = "done"
        return a

    def abort(self) -> None:
        """Free whatever was built and forget the request."""
        self.progress.phase = "failed"
        if self._staged_root is not None:
            free_staging(self.vol, self.staging_name)
            self._staged_root = None
        self._drop_tables()

    def run(self):
        try:
            while self.step():
                pass
        except BaseException:
            self.abort()
            raise
        return self.publish()


# -- staging left behind --------------------------------------------------------------------------
def staging_names(db) -> list[bytes]:
    return [r[0] for r in db.execute("SELECT name FROM dirents WHERE parent=?", (STAGING_PARENT,))]


def free_staging(vol, name: bytes) -> int:
    """Free the staging tree `name` (an interrupted or failed tree clone): every inode under it, their
    extents' references, xattrs and entries. One operation; returns the number of inodes freed."""
    db = vol.db
    with vol.operation():
        row = db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (STAGING_PARENT, name)).fetchone()
        if row is None:
            return 0
        db.execute("DROP TABLE IF EXISTS temp.tc_free")
        db.execute("CREATE TEMP TABLE tc_free(ino INTEGER PRIMARY KEY)")
        db.execute("WITH RECURSIVE sub(ino) AS (SELECT ? UNION SELECT d.ino FROM dirents d JOIN sub ON d.parent = sub.ino) "
                   "INSERT INTO tc_free SELECT ino FROM sub", (row[0],))
        runs = db.execute("SELECT e.pblock, e.nblocks FROM tc_free f JOIN extents e ON e.ino = f.ino").fetchall()
        if runs:
            vol.space.adjust(runs, -1)
        db.execute("DELETE FROM extents WHERE ino IN (SELECT ino FROM tc_free)")
        db.execute("DELETE FROM xattrs WHERE ino IN (SELECT ino FROM tc_free)")
        db.execute("DELETE FROM dirents WHERE parent IN (SELECT ino FROM tc_free)")
        db.execute("DELETE FROM dirents WHERE parent=? AND name=?", (STAGING_PARENT, name))
        n = db.execute("DELETE FROM inodes WHERE ino IN (SELECT ino FROM tc_free)").rowcount
        vol.inodes_added(-n)
        db.execute("DROP TABLE temp.tc_free")
    return n


def purge_staging(vol) -> int:
    """At mount: free the staging trees a crash left (their clone never published). Returns inodes freed."""
    names = staging_names(vol.db)
    n = sum(free_staging(vol, name) for name in names)
    if names:
        vol.commit()
    return n


def clone_tree(vol, src: int, dst_parent: int, dst_name: bytes, cred: Cred | None = None,
               batch: int | None = None):
    """Clone directory src to (dst_parent, dst_name) at once; the new directory's attributes."""
    return TreeClone(vol, src, dst_parent, dst_name, cred, batch).run()
