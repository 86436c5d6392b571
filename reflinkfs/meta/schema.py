"""The metadata database of a store: schema, version, creation and opening.

A store is one directory (mode 0700) holding `meta.db` (SQLite in WAL mode), `data` (fixed-size blocks:
segment 0) and the folder `segs` (the sparse files of the other segments). A physical block number packs
(segment, block in the segment); core/datafile.py alone turns it into a file and a byte offset, so every
table here sees one integer address space. The schema version is stored in the database; a store of
another version is refused rather than guessed at.

Tables (block numbers are physical unless the column says logical):
  meta      key -> value: schema_version, block_size, size_limit_blocks (0 = unlimited), data_blocks
            (the high-water mark of segment 0: every physical block below it is free or used), next_seg
            (the number the next new segment gets; numbers are never reused)
  inodes    one row per inode; times in nanoseconds; `blocks` = mapped blocks (kept with the extents);
            `own_seg`: the segment the file writes new blocks into, 0 for the shared data file
  segments  seg -> size_bytes: the segments other than 0 that exist (each has its file segs/<seg>);
            size_bytes is the size its file is kept at
  dirents   (parent, name) -> ino; `id` orders readdir so that paging is stable under changes
  xattrs    (ino, name) -> value
  extents   (ino, lblock) -> (pblock, nblocks): sorted, non-overlapping runs per file; gaps are holes
  refs      pblock -> (nblocks, refcount): runs of used physical blocks, refcount >= 1, non-overlapping
  free      pblock -> nblocks: free runs below data_blocks, non-overlapping, not adjacent to each other
  csums     pblock -> (nblocks, sums): runs of block checksums, non-overlapping, covering exactly the used
            blocks; sums holds the xxh3-64 of each block of the run, 8 bytes little-endian apiece (one row
            per write, not one per block)

Versions: 1 kept one csums row per block (pblock -> csum as a signed 64-bit integer). Opening a version 1
store upgrades it to version 2 in one transaction (a crash leaves it at version 1, intact). Version 2 had
the data file only; its physical block p is block p of segment 0 in version 3, so the upgrade to 3 moves
no data: it creates the empty `segs` folder (harmless to a version 2 store, so it comes first), then adds
`segments`, `inodes.own_seg` and `next_seg` in one transaction. A crash at any point leaves version 2
intact or version 3 complete; an upgraded version 1 store goes on to 3 the same way.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
from array import array

from ..errors import StoreError

SCHEMA_VERSION = 3
BLOCK_SIZE = 4096
DB_NAME = "meta.db"
DATA_NAME = "data"
SEGS_NAME = "segs"          # the folder of segments other than 0 (core/datafile.py names the files)
LOCK_NAME = "lock"

CSUMS_TABLE = "CREATE TABLE csums(pblock INTEGER PRIMARY KEY, nblocks INTEGER NOT NULL, sums BLOB NOT NULL)"
SEGMENTS_TABLE = "CREATE TABLE segments(seg INTEGER PRIMARY KEY, size_bytes INTEGER NOT NULL)"
SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE inodes(
    ino INTEGER PRIMARY KEY, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0, blocks INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0, atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, target BLOB, own_seg INTEGER NOT NULL DEFAULT 0);
CREATE TABLE dirents(
    id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    UNIQUE(parent, name));
CREATE INDEX dirents_ino ON dirents(ino);
CREATE TABLE xattrs(ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
CREATE TABLE extents(ino INTEGER NOT NULL, lblock INTEGER NOT NULL, pblock INTEGER NOT NULL,
    nblocks INTEGER NOT NULL, PRIMARY KEY(ino, lblock)) WITHOUT ROWID;
CREATE TABLE refs(pblock INTEGER PRIMARY KEY, nblocks INTEGER NOT NULL, refcount INTEGER NOT NULL);
CREATE TABLE free(pblock INTEGER PRIMARY KEY, nblocks INTEGER NOT NULL);
CREATE INDEX free_by_size ON free(nblocks, pblock);
""" + CSUMS_TABLE + ";" + SEGMENTS_TABLE + ";"
CSUM_RUN = 1024         # the most blocks a checksum run grows to: by later writes that continue it, and
                        # when version 1 rows are upgraded

ROOT_INO = 1


def connect(db_path: str) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("PRAGMA cache_size=-65536")
    return db


def mkfs(store: str, size_limit: int = 0, uid: int | None = None, gid: int | None = None,
         now_ns: int | None = None) -> None:
    """Create a new, empty store directory. Refuses a non-empty directory."""
    import time
    if os.path.exists(store):
        if not os.path.isdir(store):
            raise StoreError(f"{store}: exists and is not a directory")
        if os.listdir(store):
            raise StoreError(f"{store}: directory is not empty; choose a new path for the store")
    else:
        try:
            os.mkdir(store, 0o700)
        except OSError as e:
            raise StoreError(f"{store}: cannot create store directory: {e.strerror}") from None
    os.chmod(store, 0o700)
    if size_limit < 0:
        raise StoreError("--size must be positive")
    limit_blocks = size_limit // BLOCK_SIZE
    if size_limit and limit_blocks < 16:
        raise StoreError(f"--size {size_limit} is too small; give at least {16 * BLOCK_SIZE} bytes")
    open(os.path.join(store, DATA_NAME), "xb").close()
    os.mkdir(os.path.join(store, SEGS_NAME), 0o700)
    db = connect(os.path.join(store, DB_NAME))
    try:
        now = now_ns if now_ns is not None else time.time_ns()
        db.execute("BEGIN")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
            ("schema_version", SCHEMA_VERSION), ("block_size", BLOCK_SIZE),
            ("size_limit_blocks", limit_blocks), ("data_blocks", 0), ("next_seg", 1)])
        db.execute("INSERT INTO inodes(ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                   "VALUES (?, ?, ?, ?, 2, ?, ?, ?)",
                   (ROOT_INO, 0o40755, os.getuid() if uid is None else uid,
                    os.getgid() if gid is None else gid, now, now, now))
        db.execute("COMMIT")
    finally:
        db.close()


def lock_store(store: str) -> int:
    """Take the store's lock, which whoever uses the store holds (a mount's daemon, fsck); the returned
    descriptor holds it until it is closed. StoreError when another process holds it."""
    fd = os.open(os.path.join(store, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{store}: store is in use (mounted, or being checked); unmount it first") from None
    return fd


def open_store_db(store: str, thorough: bool = False) -> sqlite3.Connection:
    """Open a store's database and check it is one we understand; one-line StoreError otherwise.

    The cheap checks (file present, not shorter than SQLite says, schema version) run on every open;
    `thorough` adds SQLite's quick_check, which reads the whole database (fsck uses it; a mount must
    stay fast on a large store)."""
    if not os.path.isdir(store):
        raise StoreError(f"{store}: no such store directory (create one with 'reflinkfs mkfs {store}')")
    db_path = os.path.join(store, DB_NAME)
    data_path = os.path.join(store, DATA_NAME)
    if not os.path.isfile(db_path) or os.path.getsize(db_path) == 0:
        raise StoreError(f"{store}: metadata database {DB_NAME} is missing or empty; this is not a usable store")
    if not os.path.isfile(data_path):
        raise StoreError(f"{store}: data file '{DATA_NAME}' is missing; the store cannot be used")
    db = None
    try:
        wal = db_path + "-wal"
        wal_empty = not os.path.exists(wal) or os.path.getsize(wal) == 0
        db = connect(db_path)
        pages, page_size = (db.execute("PRAGMA page_count").fetchone()[0],
                            db.execute("PRAGMA page_size").fetchone()[0])
        if wal_empty and os.path.getsize(db_path) < pages * page_size:
            raise StoreError(f"{store}: metadata database is truncated "
                             f"({os.path.getsize(db_path)} of {pages * page_size} bytes)")
        if thorough:
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"{store}: metadata database is damaged ({ok})")
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        if db is not None:
            db.close()
        raise StoreError(f"{store}: metadata database is damaged or not a reflinkfs store ({e})") from None
    except StoreError:
        if db is not None:
            db.close()
        raise
    if row is None:
        db.close()
        raise StoreError(f"{store}: metadata database has no schema version; not a reflinkfs store")
    if row[0] == 1:
        try:
            _upgrade_from_1(db)
        except sqlite3.Error as e:
            db.close()
            raise StoreError(f"{store}: cannot upgrade the store from schema version 1: {e}") from None
        row = (2,)
    if row[0] == 2:
        try:
            _upgrade_from_2(store, db)
        except (sqlite3.Error, OSError) as e:
            db.close()
            raise StoreError(f"{store}: cannot upgrade the store from schema version 2: {e}") from None
        row = (SCHEMA_VERSION,)
    if row[0] != SCHEMA_VERSION:
        db.close()
        raise StoreError(f"{store}: store has schema version {row[0]}, this reflinkfs understands "
                         f"version {SCHEMA_VERSION}")
    bs = db.execute("SELECT value FROM meta WHERE key='block_size'").fetchone()
    if bs is None or bs[0] != BLOCK_SIZE:
        db.close()
        raise StoreError(f"{store}: unsupported block size {bs[0] if bs else None}")
    return db


def pack_sums(values) -> bytes:
    """The `sums` BLOB of a csums row: one xxh3-64 value per block, 8 bytes little-endian each."""
    a = array("Q", values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_sums(blob: bytes) -> array:
    a = array("Q")
    a.frombytes(blob)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _upgrade_from_1(db: sqlite3.Connection) -> None:
    """Version 1 -> 2: per-block checksum rows become runs (see the module docstring)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] != 1:
            db.execute("COMMIT")         # another process upgraded it first
            return
        db.execute("ALTER TABLE csums RENAME TO csums_v1")
        db.execute(CSUMS_TABLE)
        runs: list[tuple[int, list[int]]] = []
        for p, c in db.execute("SELECT pblock, csum FROM csums_v1 ORDER BY pblock"):
            if runs and runs[-1][0] + len(runs[-1][1]) == p and len(runs[-1][1]) < CSUM_RUN:
                runs[-1][1].append(c & 0xFFFFFFFFFFFFFFFF)
            else:
                runs.append((p, [c & 0xFFFFFFFFFFFFFFFF]))
        db.executemany("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)",
                       ((p, len(sums), pack_sums(sums)) for p, sums in runs))
        db.execute("DROP TABLE csums_v1")
        db.execute("UPDATE meta SET value=2 WHERE key='schema_version'")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _upgrade_step(name: str) -> None:
    """Called after each step of an upgrade; tests replace it to kill the process there."""


def _upgrade_from_2(store: str, db: sqlite3.Connection) -> None:
    """Version 2 -> 3: segments (see the module docstring). Every physical block keeps its meaning."""
    os.makedirs(os.path.join(store, SEGS_NAME), 0o700, exist_ok=True)
    _upgrade_step("segs folder")
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] != 2:
            db.execute("COMMIT")         # another process upgraded it first
            return
        for step, stmt in (("segments", SEGMENTS_TABLE),
                           ("own_seg", "ALTER TABLE inodes ADD COLUMN own_seg INTEGER NOT NULL DEFAULT 0"),
                           ("next_seg", "INSERT INTO meta(key, value) VALUES ('next_seg', 1)"),
                           ("version", "UPDATE meta SET value=3 WHERE key='schema_version'")):
            db.execute(stmt)
            _upgrade_step(step)
        db.execute("COMMIT")
        _upgrade_step("commit")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def get_meta(db: sqlite3.Connection, key: str) -> int:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    if row is None:
        raise StoreError(f"metadata key {key!r} is missing; the store is damaged")
    return row[0]


def set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute("UPDATE meta SET value=? WHERE key=?", (value, key))
