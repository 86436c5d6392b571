"""The filesystem core: namespace, file data over shared extents, transactions. No FUSE here.

Guarantees:
- Every public method either completes or changes nothing: each runs inside a SQLite savepoint that is
  rolled back (with the in-memory space bookkeeping) when it raises.
- Changes are grouped into transactions; `commit()` writes the data file to disk, then commits the
  metadata that refers to it, then makes that durable (sync_meta). After a crash the store opens at the
  last commit, whose blocks were never overwritten: a block with refcount > 1 or one that a committed
  state refers to is always copied on write; only blocks allocated in the open transaction are
  overwritten in place.
- Bytes past a file's size inside its last block are always zero, so growing a file (truncate, write
  past EOF, sharing a partial last block) never exposes old data.

Concurrency: the volume is not thread-safe; the FUSE adapter calls it from one thread, and each call
runs to completion without yielding. Two exceptions touch no metadata and may run in other threads:
`sync_data()` (the adapter runs it in a worker thread) and `sync_meta()` (the data file's writer thread
runs it, queued by `commit()`; it uses its own database connection).

Callers pass names as bytes, times in nanoseconds, offsets in bytes; `log_*`/`lblock` are logical
(per-file) block numbers, `pblock` physical ones.
"""
from __future__ import annotations

import bisect
import collections
import errno
import logging
import os
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import FsError, StoreError
from ..meta import schema
from ..meta.schema import BLOCK_SIZE, ROOT_INO
from . import acl
from . import extents as ext
from . import treeclone
from .blockio import UncachedIO
from . import segments
from .datafile import SEG_SHIFT, Barrier, DataFile, seg_base
from .space import Space

BS = BLOCK_SIZE
log = logging.getLogger("reflinkfs.volume")
MAX_FILE_SIZE = 1 << 46          # 64 TiB
MAX_NAME = 255
END = 1 << 62                    # "to the end of the file" in logical blocks
COPY_CHUNK = 8 << 20             # bytes copied per step when a clone must move data
CHECKPOINT_BYTES = 4 << 20       # the WAL is copied into the database once it is this big
SMALL_FILE_BYTES = 0             # a file smaller than this keeps its blocks in segment 0 (see _place)
IDENTITY_BLOCKS = 1 << 32        # logical blocks a segment can hold at identity offsets: 16 TiB, the largest
                                 # file ext4 allows; blocks past it go to segment 0 (that file is not whole)
INODE_BYTES = BS                 # what statfs charges an inode not yet created: one data block, the least
                                 # a file with any data takes (its metadata row is ~120 bytes of meta.db)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int          # mapped 4 KiB blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


_ATTR_COLS = "ino, mode, nlink, uid, gid, rdev, size, blocks, atime_ns, mtime_ns, ctime_ns"


_JOINED_COLS = ", ".join("i." + c.strip() for c in _ATTR_COLS.split(","))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_name(name: bytes) -> None:
    if len(name) > MAX_NAME:
        raise FsError(errno.ENAMETOOLONG, f"name longer than {MAX_NAME} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid name {name!r}")


class ReadMemo:
    """What reads need from the database — a file's attributes and extents — remembered between
    changes, so a read served from the cache costs no SQL.

    Valid only while nothing changes: every operation that changes the store clears it on entry and on
    exit (`_op`), and inside an operation lookups go to the database. A file's extents are remembered
    whole when it has at most FULL_MAP extents, else as the window last looked up."""
    FULL_MAP = 256
    WINDOW = 1024          # blocks looked up ahead for a file with many extents

    def __init__(self, db):
        self.db = db
        self.depth = 0
        self._attrs: dict[int, Attr] = {}
        self._maps: dict[int, tuple[int, int, list]] = {}   # ino -> (lstart, lend, extents within)

    def enter_op(self) -> None:
        self.depth += 1
        self._attrs.clear()
        self._maps.clear()

    def leave_op(self) -> None:
        self.depth -= 1
        self._attrs.clear()
        self._maps.clear()

    def attr(self, ino: int) -> Attr | None:
        return self._attrs.get(ino)

    def keep_attr(self, a: Attr) -> Attr:
        if not self.depth:
            if len(self._attrs) > 4096:
                self._attrs.clear()
            self._attrs[a.ino] = a
        return a

    def lookup(self, ino: int, start: int, end: int) -> list:
        if self.depth:
            return ext.lookup(self.db, ino, start, end)
        m = self._maps.get(ino)
        if m is None or not (m[0] <= start and end <= m[1]):
            rows = self.db.execute("SELECT lblock, pblock, nblocks FROM extents WHERE ino=? ORDER BY lblock "
                                   "LIMIT ?", (ino, self.FULL_MAP + 1)).fetchall()
            if len(rows) <= self.FULL_MAP:
                m = (0, END, rows)
            else:
                hi = max(end, start + self.WINDOW)
                m = (start, hi, ext.lookup(self.db, ino, start, hi))
            if len(self._maps) > 4096:
                self._maps.clear()
            self._maps[ino] = m
        return _clip(m[2], start, end)


def _clip(extents: list, start: int, end: int) -> list:
    """The extents overlapping [start, end), clipped to it (extents sorted by lblock)."""
    i = bisect.bisect_right(extents, (start, END)) - 1
    if i >= 0:
        lb, pb, n = extents[i]
        if end <= lb + n:                       # one extent holds the whole range: the commonest read
            return [(start, pb + start - lb, end - start)]
        if lb + n <= start:
            i += 1
    else:
        i = 0
    out = []
    while i < len(extents) and extents[i][0] < end:
        lb, pb, n = extents[i]
        lo, hi = max(lb, start), min(lb + n, end)
        out.append((lo, pb + lo - lb, hi - lo))
        i += 1
    return out


class Volume:
    """A store opened for use. Build with `Volume.open(store)`; always `close()`."""

    _cow_only = False     # set while an operation runs that must not overwrite blocks in place (see _op)
    _seg0_only = False    # set while new blocks must come from segment 0 (see _allocate_op)
    small_file_bytes = SMALL_FILE_BYTES   # files smaller than this keep their blocks in segment 0 (_place)

    def __init__(self, store: str, db, data: DataFile, lock_fd: int, io_factory=None):
        self.store = store
        self.db = db
        self.data = data
        self._lock_fd = lock_fd
        self.space = Space(db, on_release=self._released)
        self._memo = ReadMemo(db)
        self.io = (io_factory or UncachedIO)(data, self.space, self._memo.lookup)
        self._in_txn = False
        self._open: collections.Counter[int] = collections.Counter()     # ino -> open handles (unlinked
        # files live until 0)
        self._lookups: collections.Counter[int] = collections.Counter()  # ino -> the kernel's lookup count
        # under FUSE (same rule)
        self._tmpfiles: set[int] = set()       # O_TMPFILE inodes not linked yet: the one link may give nlink 0 → 1
        # Inodes that may have nlink 0 while an open handle or the kernel still refers to them: only these
        # are looked at when a release or forget lets go of an inode (a hint: one whose removal was rolled
        # back is found to have a link again, and dropped from here)
        self._unlinked: set[int] = set()
        self.last_commit = time.monotonic()
        self.commits = 0
        # COMMIT only writes the WAL; sync_meta() makes it durable (and checkpoints, on its own connection)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        self._wal_path = os.path.join(store, schema.DB_NAME + "-wal")
        self._ckpt_db: sqlite3.Connection | None = None
        self._barrier: Barrier | None = None            # the last commit's (see commit)
        # rows in `inodes`, kept in step by _new_inode/_free_inode and restored by a rollback, so that
        # statfs never counts a large table
        self._inode_rows = db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]
        # An owned segment's size follows its owner's size. The trigger notes the segments whose owner's
        # size changed (in a Python set: no SQL for an operation that changes no size; a rolled-back
        # note only costs a check); _settle_segments then keeps `segments` in step and queues the
        # resize of their files, in write order.
        # who owns a segment is asked at every commit that frees its blocks (created here, not by the schema,
        # so that stores made before it get it too)
        db.execute("CREATE INDEX IF NOT EXISTS inodes_own_seg ON inodes(own_seg) WHERE own_seg != 0")
        self._touched: set[int] = set()     # segments whose size may have to follow their owner's (this op)
        self._txn_segs: set[int] = set()    # segments written or resized in the open transaction
        db.create_function("reflinkfs_seg_touched", 1, self._touched.add, deterministic=False)
        db.execute("CREATE TEMP TRIGGER IF NOT EXISTS seg_follows_size AFTER UPDATE OF size ON inodes "
                   "WHEN NEW.own_seg != 0 AND NEW.size != OLD.size BEGIN "
                   "SELECT reflinkfs_seg_touched(NEW.own_seg); END")
        self._purge_orphans()
        treeclone.purge_staging(self)       # a tree clone the daemon did not finish (core/treeclone.py)

    # -- lifetime ------------------------------------------------------------------------------
    @classmethod
    def open(cls, store: str, io_factory=None, direct: bool = True, lock_fd: int | None = None) -> "Volume":
        """`lock_fd`: the store's lock, already taken by the caller (schema.lock_store); the volume owns it
        from here on, and closes it when it closes or fails to open."""
        try:
            db = schema.open_store_db(store)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if lock_fd is None:
            try:
                lock_fd = schema.lock_store(store)
            except BaseException:
                db.close()
                raise
        data = None
        try:
            data = DataFile(os.path.join(store, schema.DATA_NAME), direct=direct)
            data_blocks = schema.get_meta(db, "data_blocks")
            if data.size_blocks() < data_blocks:
                if data.size_blocks() == 0 and data_blocks:
                    raise StoreError(f"{store}: data file is empty but the metadata uses {data_blocks} blocks; "
                                     f"the data file was lost or replaced")
                data.ensure_size(data_blocks)   # a crash may leave it short; the missing tail reads as zeros
            segments.recover(db, data)          # punches and deletions a crash cut short
            return cls(store, db, data, lock_fd, io_factory)
        except BaseException as e:
            if data is not None:
                data.close()
            os.close(lock_fd)
            db.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise StoreError(f"{store}: metadata database is damaged ({e}); run 'reflinkfs fsck {store}'") from None
            raise

    def close(self) -> None:
        if self.db is None:
            return
        self._open.clear()          # nothing outside can refer to an inode any more: free the unlinked ones
        self._lookups.clear()
        self._purge_orphans()
        self.commit()
        self.io.close()
        self.data.close()
        if self._ckpt_db is not None:
            self._ckpt_db.close()
        self.db.close()
        os.close(self._lock_fd)
        self.db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- transactions --------------------------------------------------------------------------
    def _begin(self) -> None:
        if not self._in_txn:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    @contextmanager
    def _op(self, cow: bool = False):
        """One operation, all or nothing. `cow`: the operation writes more than once and may fail after
        a write (ENOSPC, EIO), so it must not overwrite blocks in place: a rollback restores the
        checksums but could not restore overwritten bytes."""
        self._begin()
        self._memo.enter_op()
        self.db.execute("SAVEPOINT op")
        mark, alloc_mark, inode_rows = len(self.space.pending), len(self.space.seg_allocs), self._inode_rows
        outer_cow, self._cow_only = self._cow_only, self._cow_only or cow
        try:
            yield
            self._settle_segments()
        except BaseException:
            self.db.execute("ROLLBACK TO op")
            self.db.execute("RELEASE op")
            self.space.rollback_to(mark, alloc_mark)
            self._inode_rows = inode_rows
            raise
        finally:
            self._cow_only = outer_cow
            self._memo.leave_op()
        self.db.execute("RELEASE op")

    def _settle_segments(self) -> None:
        """At the end of an operation: each segment noted in `_touched` is kept at its owner's size (a
        segment nobody owns keeps its size), and its file is resized to that, in write order, but never
        below the blocks the committed state may still read (released in this transaction): the commit
        cuts those off once it is durable."""
        if not self._touched:
            return
        touched = sorted(self._touched)
        self._touched.clear()
        for seg in touched:
            row = self.db.execute("SELECT size_bytes FROM segments WHERE seg=?", (seg,)).fetchone()
            if row is None:
                continue
            size = row[0]
            # (the "!= 0" lets SQLite use the partial index inodes_own_seg: it cannot know that ? is not 0)
            owner = self.db.execute("SELECT size FROM inodes WHERE own_seg=? AND own_seg != 0", (seg,)).fetchone()
            if owner is not None and owner[0] != size:
                size = owner[0]
                self.db.execute("UPDATE segments SET size_bytes=? WHERE seg=?", (size, seg))
            self._txn_segs.add(seg)
            self.data.resize(seg, max(size, self.space.pending_end(seg) * BS))

    def _touch_segment(self, seg: int) -> None:
        self._touched.add(seg)
        self._txn_segs.add(seg)

    def commit(self, wait: bool = True):
        """Make everything done so far durable: data first, then the metadata that refers to it.

        With wait=False the slow end is left to the data file's writer thread: the metadata is committed
        to the WAL here and the returned barrier makes it durable (None: everything already is);
        `self.data.wait_for(barrier)` waits for that. With nothing new to commit, the barrier of the last
        commit is returned while it has not run. Blocks a commit frees can be handed out at once: their
        new contents are queued behind its barrier, so they reach the disk only after the commit that
        freed them, and a power loss cannot leave an older state pointing at overwritten blocks."""
        if self._in_txn:
            if self.data.unsynced:       # else sync_data() (in a thread) already covered every write
                self.sync_data()
            self.space.on_commit()
            self.db.execute("COMMIT")
            self._in_txn = False
            self.space.after_commit()
            self.last_commit = time.monotonic()
            self.commits += 1
            punch, gone = self.space.take_released()
            resize = []
            for seg in sorted(self._txn_segs - set(gone)):   # their files, cut to the size just committed
                row = self.db.execute("SELECT size_bytes FROM segments WHERE seg=?", (seg,)).fetchone()
                if row is not None and self.data.resize(seg, row[0], queue=False):
                    resize.append((seg, row[0]))
            self._txn_segs.clear()
            for seg in gone:
                self.data.forget(seg)
            if punch or gone or resize:   # freed segment blocks leave their files only once the commit is durable
                def sync_then_release() -> None:
                    self.sync_meta()
                    self.data.release(punch, gone)
                    for seg, nbytes in resize:
                        try:
                            self.data.set_size(seg, nbytes)
                        except OSError as e:    # the next open sets it (segments.recover)
                            log.warning("cannot set segment %d to %d bytes: %s", seg, nbytes, e)
                self._barrier = self.data.barrier(sync_then_release)
            else:
                self._barrier = self.data.barrier(self.sync_meta)
        barrier = self._barrier if self._barrier is not None and not self._barrier.done else None
        if wait and barrier is not None:
            self.data.wait_for(barrier)
        return barrier

    def sync_meta(self) -> None:
        """Make the committed metadata durable: fdatasync the WAL, then copy it into the database when it
        has grown. Runs in the data file's writer thread (see commit)."""
        fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            wal_bytes = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if wal_bytes >= CHECKPOINT_BYTES:
            try:
                if self._ckpt_db is None:
                    self._ckpt_db = schema.connect(os.path.join(self.store, schema.DB_NAME))
                self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:      # the commit is durable in the WAL all the same
                log.warning("WAL checkpoint failed (%s); will try again at the next commit", e)

    def sync_data(self) -> None:
        """The first half of commit(): make the data written so far durable. It touches only the data
        file, so it may run in another thread while the loop goes on serving; commit() then syncs again
        only what was written meanwhile."""
        try:
            self.data.sync()
        except OSError as e:   # the transaction stays open: nothing that refers to unsynced data commits
            raise FsError(errno.EIO, f"cannot sync the data file: {e.strerror}; changes are not committed") from None

    @property
    def dirty(self) -> bool:
        return self._in_txn

    def _retry_enospc(self, fn, *args):
        """Run an op; on ENOSPC, commit (which frees released blocks) and try once more."""
        try:
            return fn(*args)
        except FsError as e:
            if e.errno != errno.ENOSPC or not self.space.pending:
                raise
        self.commit()
        return fn(*args)

    def _release(self, unmapped) -> None:
        """Drop one reference from each physical run of the extents just unmapped."""
        if unmapped:
            self.space.adjust([(pb, n) for _, pb, n in unmapped], -1)

    def _released(self, pblock: int, nblocks: int) -> None:
        self.io.drop_phys(pblock, nblocks)

    # -- inodes --------------------------------------------------------------------------------
    def _row(self, ino: int) -> Attr:
        row = self.db.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        return Attr(*row)

    getattr = _row

    def _dir(self, ino: int) -> Attr:
        a = self._row(ino)
        if not stat.S_ISDIR(a.mode):
            raise FsError(errno.ENOTDIR)
        return a

    def _reg(self, ino: int) -> Attr:
        a = self._row(ino)
        if stat.S_ISDIR(a.mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(a.mode):
            raise FsError(errno.EINVAL, "not a regular file")
        return a

    def _touch(self, ino: int, mtime: bool = True) -> None:
        now = time.time_ns()
        if mtime:
            self.db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (now, now, ino))
        else:
            self.db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (now, ino))

    def _child(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)).fetchone()
        return row[0] if row else None

    def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > MAX_NAME:
            self._dir(parent)
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            return self._dir(parent)
        if name == b"..":
            self._dir(parent)
            row = self.db.execute("SELECT parent FROM dirents WHERE ino=?", (parent,)).fetchone()
            return self._row(row[0] if row else ROOT_INO)
        # the common case in one statement; the parent is looked at only when the name is not there
        row = self.db.execute(f"SELECT {_JOINED_COLS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
                              "WHERE d.parent=? AND d.name=?", (parent, name)).fetchone()
        if row is None:
            self._dir(parent)           # ENOENT or ENOTDIR for the parent comes first
            raise FsError(errno.ENOENT)
        return Attr(*row)

    def _new_inode(self, parent: int, name: bytes | None, mode: int, uid: int, gid: int, rdev: int = 0,
                   target: bytes | None = None, umask: int = 0) -> Attr:
        """A new inode in parent, named name; with name None an O_TMPFILE inode: nlink 0 and no entry, like
        a file unlinked while open (it is freed the same way, unless link() gives it a name first).

        Its permissions: parent's default ACL masked by mode, which the new inode takes as its access ACL
        (and a directory as its default ACL too); without one, mode masked by umask (see core/acl.py)."""
        if name is not None:
            _check_name(name)
        p = self._dir(parent)
        if p.nlink == 0:
            raise FsError(errno.ENOENT, "directory was removed")
        if name is not None and self._child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        if p.mode & stat.S_ISGID:   # BSD group semantics of a setgid directory
            gid = p.gid
            if is_dir:
                mode |= stat.S_ISGID
        inherited: list[tuple[bytes, bytes]] = []
        if not stat.S_ISLNK(mode):  # a symlink's mode is always 0777, and it has no ACL
            row = self.db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?", (parent, acl.DEFAULT)).fetchone()
            if row is None:
                mode &= ~(umask & 0o777)
            else:
                default = acl.parse(row[0])
                mode, access = acl.inherit(default, mode)
                if access is not None:
                    inherited.append((acl.ACCESS, acl.pack(access)))
                if is_dir:
                    inherited.append((acl.DEFAULT, row[0]))
        size = len(target) if target is not None else 0
        nlink = 0 if name is None else 2 if is_dir else 1
        cur = self.db.execute("INSERT INTO inodes(mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, "
                              "ctime_ns, target) VALUES (?,?,?,?,?,?,?,?,?,?)",
                              (mode, uid, gid, nlink, size, rdev, now, now, now, target))
        ino = cur.lastrowid
        self._inode_rows += 1
        for xname, value in inherited:
            self.db.execute("INSERT INTO xattrs(ino, name, value) VALUES (?, ?, ?)", (ino, xname, value))
        new = Attr(ino, mode, nlink, uid, gid, rdev, size, 0, now, now, now)    # the row just inserted
        if name is None:
            self._tmpfiles.add(ino)
            self._unlinked.add(ino)
            return new
        self.db.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
        if is_dir:
            self.db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (parent,))
        self._touch(parent)
        return new

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              umask: int = 0) -> Attr:
        """A new file, device, fifo or socket; `umask` applies unless parent has a default ACL."""
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL, "use mkdir or symlink")
        with self._op():
            return self._new_inode(parent, name, mode, uid, gid, rdev, umask=umask)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Attr:
        return self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, umask=umask)

    def tmpfile(self, parent: int, mode: int, uid: int, gid: int, umask: int = 0) -> Attr:
        """An O_TMPFILE inode: a regular file in no directory, nlink 0, that link() may name once. The
        caller opens it at once (opened()); it is freed at its last release and forget, as an unlinked
        file is, and after a crash it is an orphan freed at the next mount."""
        with self._op():
            return self._new_inode(parent, None, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, umask=umask)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Attr:
        with self._op():
            return self._new_inode(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, umask=umask)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG, "symlink target too long")
        with self._op():
            return self._new_inode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        row = self.db.execute("SELECT mode, target FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is None:
            raise FsError(errno.ENOENT)
        if not stat.S_ISLNK(row[0]):
            raise FsError(errno.EINVAL, "not a symlink")
        return row[1]

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        with self._op():
            a = self._row(ino)
            if stat.S_ISDIR(a.mode):
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            if a.nlink == 0 and ino not in self._tmpfiles:   # the VFS refuses this too (I_LINKABLE)
                raise FsError(errno.ENOENT, "file was removed")
            _check_name(new_name)
            p = self._dir(new_parent)
            if p.nlink == 0:
                raise FsError(errno.ENOENT)
            if self._child(new_parent, new_name) is not None:
                raise FsError(errno.EEXIST)
            self.db.execute("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", (new_parent, new_name, ino))
            self.db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (ino,))
            self._touch(ino, mtime=False)
            self._touch(new_parent)
            linked = self._row(ino)
            self._tmpfiles.discard(ino)     # the last step: nothing after it can roll the link back
            self._unlinked.discard(ino)
            return linked

    def unlink(self, parent: int, name: bytes) -> None:
        with self._op():
            row = self.db.execute("SELECT d.ino, i.mode, i.nlink FROM dirents d JOIN inodes i ON i.ino = d.ino "
                                  "WHERE d.parent=? AND d.name=?", (parent, name)).fetchone()
            if row is None:
                self._dir(parent)           # ENOENT or ENOTDIR for the parent comes first
                raise FsError(errno.ENOENT)
            ino, mode, nlink = row
            if stat.S_ISDIR(mode):
                raise FsError(errno.EISDIR)
            self._remove_entry(parent, name, ino, mode, nlink)

    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        with self._op():
            self._dir(parent)
            ino = self._child(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            a = self._dir(ino)
            if self.db.execute("SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (ino,)).fetchone():
                raise FsError(errno.ENOTEMPTY)
            self._remove_entry(parent, name, ino, a.mode, a.nlink)

    def _remove_entry(self, parent: int, name: bytes, ino: int, mode: int, nlink: int) -> None:
        """Drop one directory entry of ino (whose mode and link count the caller has just read); free the
        inode when nothing refers to it any more."""
        self.db.execute("DELETE FROM dirents WHERE parent=? AND name=?", (parent, name))
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        left = 0 if is_dir else nlink - 1
        self.db.execute("UPDATE inodes SET nlink=?, ctime_ns=? WHERE ino=?", (left, now, ino))
        self.db.execute("UPDATE inodes SET nlink=nlink-?, mtime_ns=?, ctime_ns=? WHERE ino=?",
                        (int(is_dir), now, now, parent))
        if left <= 0:
            if self._open.get(ino, 0) <= 0 and self._lookups.get(ino, 0) <= 0:
                self._free_inode(ino)
            else:
                self._unlinked.add(ino)

    def _free_inode(self, ino: int) -> None:
        self._tmpfiles.discard(ino)
        self._unlinked.discard(ino)
        self.space.abandon(self.db.execute("SELECT own_seg FROM inodes WHERE ino=?", (ino,)).fetchone()[0])
        self._release(ext.unmap(self.db, ino, 0, END))
        self.io.drop_inode(ino, 0, None)
        self.db.execute("DELETE FROM xattrs WHERE ino=?", (ino,))
        self.db.execute("DELETE FROM inodes WHERE ino=?", (ino,))
        self._inode_rows -= 1

    def _purge_orphans(self) -> None:
        """Inodes unlinked while open when the daemon stopped: nothing can reach them any more."""
        orphans = [r[0] for r in self.db.execute("SELECT ino FROM inodes WHERE nlink=0")]
        if orphans:
            with self._op():
                for ino in orphans:
                    self._free_inode(ino)
            self.commit()

    def opened(self, ino: int) -> None:
        self._open[ino] += 1

    def released(self, ino: int) -> None:
        self._open[ino] -= 1
        if self._open[ino] <= 0:
            del self._open[ino]
            self._free_if_unreferenced(ino)

    def looked_up(self, ino: int) -> None:
        """The kernel was handed an entry for ino; FUSE counts these until it sends forget. An inode
        unlinked (or renamed over) while the kernel still knows it must live on: an open() that resolved
        the name just before a rename-over reaches us with the old inode, and must not get ENOENT."""
        self._lookups[ino] += 1

    def forget(self, ino: int, nlookup: int) -> None:
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._free_if_unreferenced(ino)

    def _free_if_unreferenced(self, ino: int) -> None:
        if ino not in self._unlinked or self._open.get(ino, 0) > 0 or self._lookups.get(ino, 0) > 0:
            return
        row = self.db.execute("SELECT nlink FROM inodes WHERE ino=?", (ino,)).fetchone()
        if row is not None and row[0] == 0:
            with self._op():
                self._free_inode(ino)
        else:
            self._unlinked.discard(ino)         # its removal was rolled back

    def unlinked_unforgotten(self) -> int:
        """Inodes already unlinked that only the kernel's lookup count keeps (their forget is on its way)."""
        if not self._unlinked:
            return 0
        return sum(1 for (ino,) in self.db.execute("SELECT ino FROM inodes WHERE nlink=0")
                   if self._lookups.get(ino, 0) > 0 and self._open.get(ino, 0) == 0)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        while ino != ROOT_INO:
            if ino == anc:
                return True
            row = self.db.execute("SELECT parent FROM dirents WHERE ino=?", (ino,)).fetchone()
            if row is None:
                return False
            ino = row[0]
        return anc == ROOT_INO

    # -- for modules that build operations of their own on the core's (core/treeclone.py) ----------
    def operation(self):
        """A context: one operation, all or nothing (rolled back on an exception), as every method here."""
        return self._op()

    def child(self, parent: int, name: bytes) -> int | None:
        """The inode that name in parent names, or None."""
        return self._child(parent, name)

    def is_ancestor(self, anc: int, ino: int) -> bool:
        """Whether anc is ino or one of its ancestors."""
        return self._is_ancestor(anc, ino)

    def touch(self, ino: int) -> None:
        """Set ino's mtime and ctime to now."""
        self._touch(ino)

    def inodes_added(self, n: int) -> None:
        """n inode rows were inserted (or, negative, deleted) with set-based SQL: keep statfs's count, as
        the rollback of the surrounding operation does."""
        self._inode_rows += n

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL, "unsupported rename flags")
        with self._op():
            self._dir(old_parent)
            self._dir(new_parent)
            _check_name(new_name)
            ino = self._child(old_parent, old_name)
            if ino is None:
                raise FsError(errno.ENOENT)
            a = self._row(ino)
            target = self._child(new_parent, new_name)
            src_dir = stat.S_ISDIR(a.mode)
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise FsError(errno.ENOENT)
                self._exchange(old_parent, old_name, ino, new_parent, new_name, target)
                return
            if target == ino:
                return   # both names are links to one inode: POSIX says do nothing
            if src_dir and self._is_ancestor(ino, new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                t = self._row(target)
                if stat.S_ISDIR(t.mode):
                    if not src_dir:
                        raise FsError(errno.EISDIR)
                    if self.db.execute("SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (target,)).fetchone():
                        raise FsError(errno.ENOTEMPTY)
                elif src_dir:
                    raise FsError(errno.ENOTDIR)
                self._remove_entry(new_parent, new_name, target, t.mode, t.nlink)
            self.db.execute("UPDATE dirents SET parent=?, name=? WHERE parent=? AND name=?",
                            (new_parent, new_name, old_parent, old_name))
            if src_dir and old_parent != new_parent:
                self.db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (old_parent,))
                self.db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (new_parent,))
            self._touch(old_parent)
            self._touch(new_parent)
            self._touch(ino, mtime=False)

    def _exchange(self, p1: int, n1: bytes, i1: int, p2: int, n2: bytes, i2: int) -> None:
        d1, d2 = stat.S_ISDIR(self._row(i1).mode), stat.S_ISDIR(self._row(i2).mode)
        if (d1 and self._is_ancestor(i1, p2)) or (d2 and self._is_ancestor(i2, p1)):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        self.db.execute("UPDATE dirents SET ino=? WHERE parent=? AND name=?", (i2, p1, n1))
        self.db.execute("UPDATE dirents SET ino=? WHERE parent=? AND name=?", (i1, p2, n2))
        if p1 != p2 and d1 != d2:
            moved_to_p2 = 1 if d1 else -1
            self.db.execute("UPDATE inodes SET nlink=nlink+? WHERE ino=?", (moved_to_p2, p2))
            self.db.execute("UPDATE inodes SET nlink=nlink-? WHERE ino=?", (moved_to_p2, p1))
        for i in (p1, p2):
            self._touch(i)
        for i in (i1, i2):
            self._touch(i, mtime=False)

    def readdir(self, ino: int, after_id: int = 0, limit: int = 1000) -> list[tuple[int, bytes, Attr]]:
        """Entries with id > after_id in id order: stable paging while the directory changes."""
        self._dir(ino)
        rows = self.db.execute(f"SELECT d.id, d.name, {_JOINED_COLS} "
                               "FROM dirents d JOIN inodes i ON i.ino = d.ino WHERE d.parent=? AND d.id>? "
                               "ORDER BY d.id LIMIT ?", (ino, after_id, limit)).fetchall()
        return [(r[0], r[1], Attr(*r[2:])) for r in rows]

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                ctime_ns: int | None = None) -> Attr:
        with self._op():
            a = self._row(ino)
            now = time.time_ns()
            sets: dict[str, int] = {}
            if size is not None:
                if stat.S_ISDIR(a.mode):
                    raise FsError(errno.EISDIR)
                if not stat.S_ISREG(a.mode):
                    raise FsError(errno.EINVAL)
                self._truncate(ino, a.size, size)
                sets["mtime_ns"] = now
            if mode is not None:
                sets["mode"] = stat.S_IFMT(a.mode) | (mode & 0o7777)
                self._chmod_acl(ino, mode)
            if uid is not None:
                sets["uid"] = uid
            if gid is not None:
                sets["gid"] = gid
            if atime_ns is not None:
                sets["atime_ns"] = atime_ns
            if mtime_ns is not None:
                sets["mtime_ns"] = mtime_ns
            sets["ctime_ns"] = ctime_ns if ctime_ns is not None else now
            self.db.execute(f"UPDATE inodes SET {', '.join(k + '=?' for k in sets)} WHERE ino=?",
                            (*sets.values(), ino))
            return self._row(ino)

    # -- extended attributes -------------------------------------------------------------------
    def _chmod_acl(self, ino: int, mode: int) -> None:
        """chmod on an inode with an access ACL: its owner, mask (or group) and other entries follow."""
        row = self.db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, acl.ACCESS)).fetchone()
        if row is not None:
            self.db.execute("UPDATE xattrs SET value=? WHERE ino=? AND name=?",
                            (acl.pack(acl.chmod(acl.parse(row[0]), mode)), ino, acl.ACCESS))

    def _set_acl(self, a: Attr, name: bytes, value: bytes) -> bool:
        """Setting an ACL (see core/acl.py): checked; an access ACL sets the mode's permission bits and is
        stored only if the mode cannot say it all. False when nothing is to be stored."""
        entries = acl.parse(value)
        if name == acl.DEFAULT:
            if not stat.S_ISDIR(a.mode):
                raise FsError(errno.EACCES, "a default ACL is only for directories")
            return True
        self.db.execute("UPDATE inodes SET mode=? WHERE ino=?", ((a.mode & ~0o777) | acl.mode_bits(entries), a.ino))
        if acl.is_minimal(entries):
            self.db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (a.ino, name))
            return False
        return True

    def getxattr(self, ino: int, name: bytes) -> bytes:
        # one statement: the inode, and its attribute if it has it (most asked for are absent: ls -l asks
        # every file for its ACL, the kernel asks for security.capability before writes)
        row = self.db.execute("SELECT i.ino, x.value FROM inodes i LEFT JOIN xattrs x ON x.ino = i.ino AND x.name = ? "
                              "WHERE i.ino = ?", (name, ino)).fetchone()
        if row is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        if row[1] is None:
            raise FsError(errno.ENODATA)
        return row[1]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE, "xattr name length out of range")
        if len(value) > 65536:
            raise FsError(errno.E2BIG, "xattr value too large")
        with self._op():
            a = self._row(ino)
            exists = self.db.execute("SELECT 1 FROM xattrs WHERE ino=? AND name=?", (ino, name)).fetchone()
            if flags & XATTR_CREATE and exists:
                raise FsError(errno.EEXIST)
            if flags & XATTR_REPLACE and not exists:
                raise FsError(errno.ENODATA)
            if name not in acl.NAMES or self._set_acl(a, name, value):
                self.db.execute("INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES (?, ?, ?)",
                                (ino, name, value))
            self._touch(ino, mtime=False)

    def listxattr(self, ino: int) -> list[bytes]:
        self._row(ino)
        return [r[0] for r in self.db.execute("SELECT name FROM xattrs WHERE ino=? ORDER BY name", (ino,))]

    def removexattr(self, ino: int, name: bytes) -> None:
        with self._op():
            self._row(ino)
            if self.db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name)).rowcount == 0:
                raise FsError(errno.ENODATA)
            self._touch(ino, mtime=False)

    # -- file data -----------------------------------------------------------------------------
    def _read_blocks(self, ino: int, start: int, end: int) -> list:
        """Buffers holding logical blocks [start, end) of a file; holes as zeros."""
        return self.io.read_blocks(ino, start, end)

    def read(self, ino: int, offset: int, nbytes: int):
        """Up to nbytes at offset, as one buffer (bytes or a memoryview)."""
        parts = self.read_parts(ino, offset, nbytes)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def read_parts(self, ino: int, offset: int, nbytes: int) -> list:
        """Up to nbytes at offset, as a list of buffers to be sent in order: views into cached units where
        the cache has them, so a large read is never copied into one new buffer (the mount replies with
        them as an iovec)."""
        a = self._memo.attr(ino) or self._memo.keep_attr(self._reg(ino))
        end = min(a.size, offset + nbytes)
        if offset >= end:
            return [b""]
        b0, b1 = offset // BS, _ceil_div(end, BS)
        parts = self._read_blocks(ino, b0, b1)
        lo, tail = offset - b0 * BS, b1 * BS - end        # each part is whole blocks: lo, tail < one part
        if lo or tail:
            if len(parts) == 1:
                parts = [memoryview(parts[0])[lo:len(parts[0]) - tail]]
            else:
                first, last = memoryview(parts[0]), memoryview(parts[-1])
                parts = [first[lo:], *parts[1:-1], last[:len(last) - tail]]
        return parts

    def write(self, ino: int, offset: int, data, stable: bool = False) -> int:
        """Write data (any buffer) at offset. The data file queues it, so a buffer that may change once
        this returns is copied first; stable=True says it never changes (bytes never do)."""
        nbytes = len(data)
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset + nbytes > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, "write past the maximum file size")
        if nbytes == 0:
            return 0
        if not stable and not isinstance(data, bytes):
            data = bytes(data)
        self._retry_enospc(self._write_op, ino, offset, data)
        return nbytes

    def _write_op(self, ino: int, offset: int, data) -> None:
        with self._op():
            self._reg(ino)
            self._write_range(ino, offset, data)
            now = time.time_ns()
            self.db.execute("UPDATE inodes SET size=MAX(size, ?), mtime_ns=?, ctime_ns=? WHERE ino=?",
                            (offset + len(data), now, now, ino))

    def _write_range(self, ino: int, offset: int, data) -> None:
        """Write bytes at any offset: partial first/last blocks are merged with their old contents."""
        nbytes = len(data)
        b0, b1 = offset // BS, _ceil_div(offset + nbytes, BS)
        head, tail = offset - b0 * BS, (offset + nbytes) % BS
        if head or tail:
            buf = bytearray((b1 - b0) * BS)
            if head:
                buf[0:BS] = b"".join(self._read_blocks(ino, b0, b0 + 1))
            if tail and (b1 - 1 > b0 or not head):
                buf[-BS:] = b"".join(self._read_blocks(ino, b1 - 1, b1))
            buf[head:head + nbytes] = data
            data = buf
        self._write_blocks(ino, b0, data)

    def _write_blocks(self, ino: int, lblock: int, data) -> None:
        """Write whole blocks: in place where the block is fresh (and in segment 0 or the file's own
        segment), elsewhere to newly allocated blocks (see _place). Every block is allocated before any
        is written, so a failure (ENOSPC) leaves nothing half written."""
        nblocks = len(data) // BS
        end = lblock + nblocks
        in_place: list[tuple[int, int, int]] = []   # (lblock, pblock, n)
        new: list[tuple[int, int]] = []              # (lblock, n)
        cow: list[tuple[int, int]] = []              # the pieces of new that are mapped now
        own = None
        pos = lblock
        for lb, pb, n in ext.lookup(self.db, ino, lblock, end):
            if lb > pos:
                new.append((pos, lb - pos))
            seg = pb >> SEG_SHIFT
            if seg and own is None:
                own = self._own_seg(ino)
            # a fresh block elsewhere (a segment the file rolled away from) is not rewritten in place: that
            # segment's size no longer follows this file's
            in_place_ok = not self._cow_only and (seg == 0 or seg == own)
            for s, e, fresh in self.space.fresh.pieces(pb, pb + n):
                if fresh and in_place_ok:
                    in_place.append((lb + s - pb, s, e - s))
                else:
                    new.append((lb + s - pb, e - s))
                    cow.append(new[-1])
            pos = lb + n
        if pos < end:
            new.append((pos, end - pos))
        mv = memoryview(data)
        placed: list[tuple[int, int, int]] = []
        rolled_from = 0
        if new:
            placed, rolled_from = self._place(ino, new)       # may fail: before any write
        if rolled_from:
            # the file left its own segment: its fresh blocks there go to the new one, at their places
            moved = [(lb, n) for lb, pb, n in in_place if pb >> SEG_SHIFT == rolled_from]
            if moved:
                in_place = [r for r in in_place if r[1] >> SEG_SHIFT != rolled_from]
                base = seg_base(self._own_seg(ino))
                for lb, n in moved:
                    self.space.alloc_at(base + lb, n)
                    placed.append((lb, base + lb, n))
                cow += moved
        for lb, pb, n in in_place:
            self.io.write(ino, lb, pb, mv[(lb - lblock) * BS:(lb - lblock + n) * BS])
        if placed:
            for lb, n in cow:                         # the other pieces are holes
                self._release(ext.unmap(self.db, ino, lb, lb + n))
            self.io.drop_inode(ino, lblock, end)
            for lb, pb, n in placed:
                ext.map_run(self.db, ino, lb, pb, n)
                self.io.write(ino, lb, pb, mv[(lb - lblock) * BS:(lb - lblock + n) * BS])
        if rolled_from:
            self._follow(ino, rolled_from, lblock, end)

    def _own_seg(self, ino: int) -> int:
        return self.db.execute("SELECT own_seg FROM inodes WHERE ino=?", (ino,)).fetchone()[0]

    def _place(self, ino: int, new: list[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], int]:
        """Allocate physical blocks for the logical pieces `new` ((lblock, n), unmapped or to be replaced):
        ([(lblock, pblock, n)], the own segment the file rolled away from, else 0).

        Identity layout: logical block L goes to block L of the file's own segment when those blocks are
        free there (no file uses them, none did since the last commit) and the segment is still its own (a
        shared one is frozen: segments.freeze). Otherwise the file rolls to a new own segment, where every
        block is free. Segment 0 (which reuses freed runs) takes the blocks of a file smaller than
        SMALL_FILE_BYTES, blocks past IDENTITY_BLOCKS, blocks reserved past the end of the file, the blocks
        an operation that must not overwrite in place (_cow_only) cannot put at their places, and every
        write for which the size limit leaves no room at identity offsets."""
        size, own = self.db.execute("SELECT size, own_seg FROM inodes WHERE ino=?", (ino,)).fetchone()
        need = sum(n for _, n in new)
        end = max(lb + n for lb, n in new)
        room = self.space.room_to_grow()
        identity = (not self._seg0_only and end <= IDENTITY_BLOCKS and (room is None or need <= room)
                    and (own or max(size, end * BS) >= self.small_file_bytes))
        taken = identity and own and not all(self.space.is_free_at(seg_base(own) + lb, n) for lb, n in new)
        if taken and self._cow_only:
            # an operation that may fail after a write (punch, zero, clone: their partial blocks) does
            # not roll the file to a new segment for a block or two: they go to segment 0
            identity = False
        if identity:
            rolled_from = 0
            if not own or taken:
                if own:
                    self._abandon(own)
                    rolled_from = own
                own = self.space.new_segment(ino, size)
                self.data.created(own)
            base = seg_base(own)
            placed = [(lb, base + lb, n) for lb, n in new]
            for _, pb, n in placed:
                self.space.alloc_at(pb, n)
            self._touch_segment(own)
            return placed, rolled_from
        runs = self.space.alloc(need)
        self.data.ensure_size(self.space.data_blocks)
        placed = []
        ri, roff = 0, 0
        for lb, n in new:                     # hand out the allocated runs to the new pieces, in order
            while n:
                rp, rn = runs[ri]
                take = min(n, rn - roff)
                placed.append((lb, rp + roff, take))
                lb, n, roff = lb + take, n - take, roff + take
                if roff == rn:
                    ri, roff = ri + 1, 0
        return placed, 0

    def _abandon(self, seg: int) -> None:
        """The file that owned seg rolls away from it: seg is nobody's own from now on, and is kept at a
        size that covers every block still in it."""
        base = seg_base(seg)
        row = self.db.execute("SELECT pblock + nblocks FROM refs WHERE pblock < ? ORDER BY pblock DESC LIMIT 1",
                              (base + (1 << SEG_SHIFT),)).fetchone()
        if row and row[0] > base:
            self.db.execute("UPDATE segments SET size_bytes=MAX(size_bytes, ?) WHERE seg=?", ((row[0] - base) * BS, seg))
        self._touch_segment(seg)
        self.space.abandon(seg)

    def _follow(self, ino: int, old: int, skip_lo: int, skip_hi: int) -> None:
        """The file just rolled from segment old to a new own segment: move its fresh blocks in old (outside
        [skip_lo, skip_hi), which the write has placed) to their places in the new one, so that a file
        whose every block is new since the last commit can still be whole. Left where they are when the
        file keeps committed blocks in old (it spans two segments anyway), or the size limit leaves no
        room."""
        base = seg_base(self._own_seg(ino))
        pieces = []
        for lb, pb, n in ext.all_extents(self.db, ino):
            if pb >> SEG_SHIFT != old:
                continue
            for s, e, fresh in self.space.fresh.pieces(pb, pb + n):
                lo, hi = lb + s - pb, lb + e - pb
                if not fresh:
                    return
                for a, b in ((lo, min(hi, skip_lo)), (max(lo, skip_hi), hi)):
                    if a < b:
                        pieces.append((a, b - a))
        if not pieces:
            return
        room = self.space.room_to_grow()
        if room is not None and sum(n for _, n in pieces) > room:
            return
        for lb, n in pieces:
            buf = b"".join(self._read_blocks(ino, lb, lb + n))
            self.space.alloc_at(base + lb, n)
            self._release(ext.unmap(self.db, ino, lb, lb + n))
            self.io.drop_inode(ino, lb, lb + n)
            ext.map_run(self.db, ino, lb, base + lb, n)
            self.io.write(ino, lb, base + lb, memoryview(buf))

    def _zero_range(self, ino: int, size: int, start: int, end: int) -> None:
        """Make bytes [start, end) of a file read as zeros without allocating for holes."""
        end = min(end, _ceil_div(size, BS) * BS)
        if start >= end:
            return
        b0, b1 = _ceil_div(start, BS), end // BS
        if b0 > b1:   # inside one block
            if ext.lookup(self.db, ino, start // BS, start // BS + 1):
                self._write_range(ino, start, bytes(end - start))
            return
        if start < b0 * BS and ext.lookup(self.db, ino, b0 - 1, b0):
            self._write_range(ino, start, bytes(b0 * BS - start))
        if b0 < b1:
            self._release(ext.unmap(self.db, ino, b0, b1))
            self.io.drop_inode(ino, b0, b1)
        if end > b1 * BS and ext.lookup(self.db, ino, b1, b1 + 1):
            self._write_range(ino, b1 * BS, bytes(end - b1 * BS))

    def _truncate(self, ino: int, old_size: int, new_size: int) -> None:
        if new_size < 0:
            raise FsError(errno.EINVAL)
        if new_size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        if new_size < old_size:
            keep = _ceil_div(new_size, BS)
            self._release(ext.unmap(self.db, ino, keep, END))
            self.io.drop_inode(ino, keep, None)
            if new_size % BS:
                self._zero_range(ino, keep * BS, new_size, keep * BS)
        self.db.execute("UPDATE inodes SET size=? WHERE ino=?", (new_size, ino))

    def truncate(self, ino: int, size: int) -> Attr:
        return self.setattr(ino, size=size)

    def punch_hole(self, ino: int, offset: int, nbytes: int) -> None:
        """Deallocate [offset, offset+nbytes); it reads as zeros; the size does not change."""
        if offset < 0 or nbytes <= 0:
            raise FsError(errno.EINVAL)
        with self._op(cow=True):
            a = self._reg(ino)
            self._zero_range(ino, a.size, offset, offset + nbytes)
            self._touch(ino)

    def allocate(self, ino: int, offset: int, nbytes: int, keep_size: bool = False) -> None:
        """Reserve blocks for [offset, offset+nbytes): holes there get zeroed blocks of their own."""
        if offset < 0 or nbytes <= 0:
            raise FsError(errno.EINVAL)
        if offset + nbytes > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        self._retry_enospc(self._allocate_op, ino, offset, nbytes, keep_size)

    def _allocate_op(self, ino: int, offset: int, nbytes: int, keep_size: bool) -> None:
        with self._op():
            a = self._reg(ino)
            b0, b1 = offset // BS, _ceil_div(offset + nbytes, BS)
            pos = b0
            holes = []
            for lb, _, n in ext.lookup(self.db, ino, b0, b1):
                if lb > pos:
                    holes.append((pos, lb))
                pos = lb + n
            if pos < b1:
                holes.append((pos, b1))
            # blocks reserved past the end of the file (keep_size) cannot be at identity offsets: the
            # segment's file ends where the file does
            outer, self._seg0_only = self._seg0_only, self._seg0_only or (keep_size and b1 * BS > a.size)
            try:
                for s, e in holes:
                    self._write_blocks(ino, s, bytes((e - s) * BS))
            finally:
                self._seg0_only = outer
            if not keep_size and offset + nbytes > a.size:
                self.db.execute("UPDATE inodes SET size=? WHERE ino=?", (offset + nbytes, ino))
            self._touch(ino, mtime=not keep_size)

    def zero_range(self, ino: int, offset: int, nbytes: int, keep_size: bool = False) -> None:
        if offset < 0 or nbytes <= 0:
            raise FsError(errno.EINVAL)
        if offset + nbytes > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        with self._op(cow=True):
            a = self._reg(ino)
            self._zero_range(ino, a.size, offset, offset + nbytes)
            if not keep_size and offset + nbytes > a.size:
                self.db.execute("UPDATE inodes SET size=? WHERE ino=?", (offset + nbytes, ino))
            self._touch(ino)

    def seek(self, ino: int, log_off: int, whence: int) -> int:
        """lseek(2)'s SEEK_DATA and SEEK_HOLE, answered from the extent map as ext4, xfs and tmpfs answer.

        Data and holes are whole 4 KiB blocks: a mapped block is data (blocks reserved by fallocate
        too, as on tmpfs), an unmapped one a hole. SEEK_DATA gives the first offset >= log_off in a
        mapped block, SEEK_HOLE the first in an unmapped one; the end of the file counts as a hole, so a
        mapped block that straddles it is data up to the size. ENXIO when log_off is negative or at or
        past the end, and for SEEK_DATA when no data follows before the end; EINVAL for another whence.
        Cost: SEEK_DATA two indexed lookups; SEEK_HOLE one, plus the extents that follow without a gap."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL, f"seek: whence {whence} is neither SEEK_DATA nor SEEK_HOLE")
        size = self._reg(ino).size
        if log_off < 0 or log_off >= size:
            raise FsError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            lblock = ext.first_mapped(self.db, ino, log_off // BS)
            log_pos = size if lblock is None else max(log_off, lblock * BS)
            if log_pos >= size:
                raise FsError(errno.ENXIO)
            return log_pos
        lblock = ext.first_hole(self.db, ino, log_off // BS, limit=_ceil_div(size, BS))
        return min(max(log_off, lblock * BS), size)

    # -- clones --------------------------------------------------------------------------------
    def clone_range(self, src: int, src_off: int, dst: int, dst_off: int, nbytes: int) -> int:
        """Make dst[dst_off:dst_off+n] equal src[src_off:src_off+n], sharing whole blocks.

        n is nbytes clipped to the source's size; the return value is n. Block-aligned parts share
        physical extents (cost O(extents)); unaligned heads and tails are copied. The source's partial
        last block is shared too when the range ends at the source's EOF and at or past the
        destination's EOF. Overlapping ranges of one file are refused (EINVAL).
        """
        if src_off < 0 or dst_off < 0 or nbytes < 0:
            raise FsError(errno.EINVAL)
        return self._retry_enospc(self._clone_op, src, src_off, dst, dst_off, nbytes)

    def _clone_op(self, src: int, src_off: int, dst: int, dst_off: int, nbytes: int) -> int:
        with self._op(cow=True):
            s_attr, d_attr = self._reg(src), self._reg(dst)
            n = max(0, min(nbytes, s_attr.size - src_off))
            if n == 0:
                return 0
            if dst_off + n > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            if src == dst and src_off < dst_off + n and dst_off < src_off + n:
                raise FsError(errno.EINVAL, "source and destination ranges overlap")
            if (src_off - dst_off) % BS:
                self._copy(src, src_off, dst, dst_off, n)   # block boundaries never line up
            else:
                head = min(n, (-src_off) % BS)
                sb = _ceil_div(src_off, BS)
                se = (src_off + n) // BS
                tail = (src_off + n) - max(se * BS, src_off + head)
                if tail and src_off + n == s_attr.size and dst_off + n >= d_attr.size:
                    se += 1           # share the partial last block: its bytes past EOF are zero
                    tail = 0
                if head:
                    self._copy(src, src_off, dst, dst_off, head)
                if se > sb:
                    self._share(src, sb, se, dst, sb + (dst_off - src_off) // BS)
                if tail:
                    self._copy(src, src_off + n - tail, dst, dst_off + n - tail, tail)
            if dst_off + n > d_attr.size:
                self.db.execute("UPDATE inodes SET size=? WHERE ino=?", (dst_off + n, dst))
            self._touch(dst)
            return n

    def clone_file(self, src: int, dst: int) -> int:
        """Replace dst's contents with src's, sharing every block (the last partial one too)."""
        if src == dst:
            raise FsError(errno.EINVAL, "source and destination are the same file")
        with self._op():
            s_attr, d_attr = self._reg(src), self._reg(dst)
            self._truncate(dst, d_attr.size, 0)
            done = self._clone_op(src, 0, dst, 0, s_attr.size)
            if done == 0:
                self._touch(dst)
            return done

    def _copy(self, src: int, src_off: int, dst: int, dst_off: int, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            step = min(COPY_CHUNK, nbytes - done)
            b0 = (src_off + done) // BS
            b1 = _ceil_div(src_off + done + step, BS)
            buf = b"".join(self._read_blocks(src, b0, b1))
            lo = src_off + done - b0 * BS
            self._write_range(dst, dst_off + done, memoryview(buf)[lo:lo + step])
            done += step

    def _share(self, src: int, sb: int, se: int, dst: int, db_: int) -> None:
        shift = db_ - sb
        runs = ext.lookup(self.db, src, sb, se)
        segments.freeze(self.db, src, runs)
        self.space.adjust([(pb, n) for _, pb, n in runs], +1)
        self._release(ext.unmap(self.db, dst, db_, db_ + (se - sb)))
        self.io.drop_inode(dst, db_, db_ + (se - sb))
        ext.map_runs(self.db, dst, [(lb + shift, pb, n) for lb, pb, n in runs])

    # -- inspection ----------------------------------------------------------------------------
    def extent_map(self, ino: int) -> list[tuple[int, int, int, int]]:
        """(lblock, pblock, nblocks, refcount) pieces of a file, split where refcounts change."""
        self._row(ino)
        out = []
        for lb, pb, n in ext.all_extents(self.db, ino):
            for p, m, rc in self.space.refcounts(pb, n):
                out.append((lb + p - pb, p, m, rc))
        return out

    def wholeness(self, ino: int) -> segments.Wholeness:
        """Whether regular file ino is whole: one segment holds exactly its bytes (core/segments.py)."""
        self._reg(ino)
        self._settle_files()
        return segments.wholeness(self.db, self.data, ino)

    def _settle_files(self) -> None:
        """Wait until the writes and resizes queued so far are in the segment files, so that what looks at
        the files (wholeness) sees what the metadata describes."""
        self.data.wait_for(self.data.barrier(lambda: None))

    def statfs(self) -> dict:
        """Space and inode figures. The store has no inode table to run out of: an inode is a row, so its
        count is bounded only by space. Inodes in use are the rows of `inodes` (files, directories,
        symlinks, device nodes, and files unlinked while open until their last user lets go); free
        inodes are how many more the available space could hold at INODE_BYTES each (the way XFS derives
        them from free blocks); total = used + free."""
        sp = self.space
        free_runs = sp.free_blocks() + sum(n for _, n in sp.pending)
        if sp.limit_blocks:
            total = sp.limit_blocks
            avail = free_runs + max(0, sp.limit_blocks - sp.data_blocks - sp.seg_blocks)
        else:
            vfs = os.statvfs(self.store)
            backing_free = vfs.f_bavail * vfs.f_frsize // BS
            total = sp.data_blocks + sp.seg_blocks + backing_free
            avail = free_runs + backing_free
        files_free = avail * BS // INODE_BYTES
        return {"block_size": BS, "blocks": total, "blocks_free": avail, "blocks_avail": avail,
                "files": self._inode_rows + files_free, "files_free": files_free, "files_used": self._inode_rows,
                "namemax": MAX_NAME}

    def usage(self) -> dict:
        """Logical bytes (mapped by files), physical bytes (distinct blocks in use), the saving, and how
        many files (and bytes) are whole."""
        logical = self.db.execute("SELECT COALESCE(SUM(nblocks), 0) FROM extents").fetchone()[0] * BS
        physical = self.db.execute("SELECT COALESCE(SUM(nblocks), 0) FROM refs").fetchone()[0] * BS
        return {"logical_bytes": logical, "physical_bytes": physical, "saved_bytes": logical - physical,
                "sharing_ratio": (logical / physical) if physical else 1.0,
                **self._whole_usage()}

    def _whole_usage(self) -> dict:
        self._settle_files()
        return segments.whole_usage(self.db, self.data)
