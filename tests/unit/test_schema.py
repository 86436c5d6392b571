"""Creating and opening stores; every refusal is a StoreError with a one-line message."""
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys

import pytest

from reflinkfs.core.volume import Volume
from reflinkfs.errors import StoreError
from reflinkfs.meta import schema
from reflinkfs.meta.schema import DATA_NAME, DB_NAME, SCHEMA_VERSION, mkfs, open_store_db


def _one_line_error(store, fn=None) -> str:
    with pytest.raises(StoreError) as e:
        (fn or Volume.open)(store)
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_mkfs_creates_an_empty_store(tmp_path):
    store = str(tmp_path / "s")
    mkfs(store, size_limit=1 << 20, uid=123, gid=456)
    assert {DATA_NAME, DB_NAME} <= set(os.listdir(store))
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert os.path.getsize(os.path.join(store, DATA_NAME)) == 0
    db = open_store_db(store)
    try:
        assert schema.get_meta(db, "schema_version") == SCHEMA_VERSION
        assert schema.get_meta(db, "size_limit_blocks") == 256
        assert schema.get_meta(db, "data_blocks") == 0
        root = db.execute("SELECT mode, nlink, uid, gid FROM inodes WHERE ino=1").fetchone()
        assert root == (stat.S_IFDIR | 0o755, 2, 123, 456)
        assert db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0] == 1
    finally:
        db.close()


def test_mkfs_refuses_non_empty_directory_and_tiny_limit(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        mkfs(str(d))
    with pytest.raises(StoreError, match="too small"):
        mkfs(str(tmp_path / "tiny"), size_limit=4096)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        mkfs(str(f))


def test_unknown_schema_version(store):
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    msg = _one_line_error(store)
    assert f"schema version {SCHEMA_VERSION + 1}" in msg and store in msg


def test_missing_store_directory(tmp_path):
    msg = _one_line_error(str(tmp_path / "nope"))
    assert "no such store" in msg and "mkfs" in msg


def test_missing_db(store):
    os.unlink(os.path.join(store, DB_NAME))
    assert "missing" in _one_line_error(store)


def test_damaged_db_garbage_bytes(store):
    path = os.path.join(store, DB_NAME)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    with open(path, "wb") as f:
        f.write(os.urandom(8192))
    msg = _one_line_error(store)
    assert "damaged" in msg and store in msg


def test_sqlite_db_that_is_not_a_store(store):
    path = os.path.join(store, DB_NAME)
    os.unlink(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other(x)")
    db.commit()
    db.close()
    assert "not a reflinkfs store" in _one_line_error(store)


def test_missing_data_file(store):
    os.unlink(os.path.join(store, DATA_NAME))
    msg = _one_line_error(store)
    assert "data file" in msg and "missing" in msg


def test_emptied_data_file(store):
    v = Volume.open(store)
    ino = v.create(1, b"f", 0o644, 0, 0).ino
    v.allocate(ino, 0, 10000, keep_size=True)     # blocks reserved past the end live in segment 0
    v.close()
    os.truncate(os.path.join(store, DATA_NAME), 0)
    assert "data file is empty" in _one_line_error(store)


def test_lost_segment_file(store):
    v = Volume.open(store)
    ino = v.create(1, b"f", 0o644, 0, 0).ino
    v.write(ino, 0, b"x" * 10000)                 # in a segment of its own
    v.close()
    (seg,) = os.listdir(os.path.join(store, schema.SEGS_NAME))
    os.unlink(os.path.join(store, schema.SEGS_NAME, seg))
    msg = _one_line_error(store)
    assert f"{schema.SEGS_NAME}/{seg}" in msg and "missing" in msg


def test_store_in_use(store):
    v = Volume.open(store)
    try:
        assert "in use" in _one_line_error(store)
    finally:
        v.close()
    Volume.open(store).close()    # the lock is released on close


def make_version_2(store: str) -> None:
    """Turn a closed store into the version 2 layout: no segments folder, table, column or counter. Its
    files must have been written with Volume.small_file_bytes past their sizes (in segment 0)."""
    assert not os.listdir(os.path.join(store, schema.SEGS_NAME)), "version 2 keeps every block in the data file"
    shutil.rmtree(os.path.join(store, schema.SEGS_NAME))
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    db.executescript("DROP INDEX IF EXISTS inodes_own_seg; DROP TABLE segments; ALTER TABLE inodes DROP COLUMN own_seg; "
                     "DELETE FROM meta WHERE key='next_seg'; UPDATE meta SET value=2 WHERE key='schema_version';")
    db.close()


def test_version_1_store_is_upgraded_on_open(tmp_path):
    """A version 1 store (one checksum row per block, signed) opens as version 3 with the same sums."""
    import xxhash
    store = str(tmp_path / "v1")
    mkfs(store)
    v = Volume.open(store)
    v.small_file_bytes = 1 << 62        # everything in segment 0, as version 2 kept it
    a = v.create(1, b"a", 0o644, 0, 0).ino
    data = os.urandom(1500 * 4096 + 100)
    v.write(a, 0, data)
    v.commit()
    v.close()
    make_version_2(store)
    # rewrite it the way version 1 kept checksums
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    per_block = []
    with open(os.path.join(store, DATA_NAME), "rb") as f:
        for p, n, _ in db.execute("SELECT pblock, nblocks, sums FROM csums").fetchall():
            for q in range(p, p + n):
                f.seek(q * 4096)
                h = xxhash.xxh3_64_intdigest(f.read(4096))
                per_block.append((q, h - (1 << 64) if h >= 1 << 63 else h))
    db.executescript("DROP TABLE csums; CREATE TABLE csums(pblock INTEGER PRIMARY KEY, csum INTEGER NOT NULL);")
    db.executemany("INSERT INTO csums VALUES (?, ?)", per_block)
    db.execute("UPDATE meta SET value=1 WHERE key='schema_version'")
    db.commit()
    db.close()
    assert any(c < 0 for _, c in per_block)          # the signed encoding is exercised
    v = Volume.open(store)
    try:
        assert schema.get_meta(v.db, "schema_version") == SCHEMA_VERSION == 3
        rows = v.db.execute("SELECT pblock, nblocks FROM csums ORDER BY pblock").fetchall()
        assert len(rows) == -(-len(per_block) // schema.CSUM_RUN)
        assert bytes(v.read(a, 0, len(data))) == data       # every block verifies against its upgraded sum
    finally:
        v.close()
    from reflinkfs.check import fsck
    assert fsck(store, verify_data=True).findings == []


def _v2_store_with_files(tmp_path):
    store = str(tmp_path / "v2")
    mkfs(store)
    v = Volume.open(store)
    v.small_file_bytes = 1 << 62        # everything in segment 0, as version 2 kept it
    files = {}
    for i, n in enumerate((1, 5000, 3 * 4096 + 17)):
        ino = v.create(1, f"f{i}".encode(), 0o644, 0, 0).ino
        files[ino] = os.urandom(n)
        v.write(ino, 0, files[ino])
    v.commit()
    v.close()
    make_version_2(store)
    return store, files


def _used_blocks(store: str) -> int:
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    try:
        return db.execute("SELECT value FROM meta WHERE key='data_blocks'").fetchone()[0]
    finally:
        db.close()


def _version(store: str) -> int:
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    try:
        return db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    finally:
        db.close()


KILL_AT = r"""
import os, signal, sys
from reflinkfs.meta import schema
def step(name):
    if name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
schema._upgrade_step = step
schema.open_store_db(sys.argv[1]).close()
"""


@pytest.mark.parametrize("step", ["segs folder", "segments", "own_seg", "next_seg", "version", "commit"])
def test_version_2_upgrade_killed_at_each_step_leaves_v2_or_v3_with_every_byte(tmp_path, step):
    """kill -9 after each step of the upgrade: the store reads as version 2 (before the commit) or 3
    (after it), never in between, and then opens as version 3 with every byte and a clean fsck."""
    from reflinkfs.check import fsck
    store, files = _v2_store_with_files(tmp_path)
    p = subprocess.run([sys.executable, "-c", KILL_AT, store, step])
    assert p.returncode == -signal.SIGKILL
    assert _version(store) == (3 if step == "commit" else 2)
    if _version(store) == 2:       # nothing of the open transaction is visible
        db = sqlite3.connect(os.path.join(store, DB_NAME))
        assert db.execute("SELECT name FROM sqlite_master WHERE name='segments'").fetchone() is None
        assert "own_seg" not in [r[1] for r in db.execute("PRAGMA table_info(inodes)")]
        db.close()
    v = Volume.open(store)
    try:
        assert schema.get_meta(v.db, "schema_version") == 3
        assert schema.get_meta(v.db, "next_seg") == 1
        for ino, data in files.items():
            assert bytes(v.read(ino, 0, len(data) + 10)) == data
    finally:
        v.close()
    assert os.path.isdir(os.path.join(store, schema.SEGS_NAME))
    assert fsck(store, verify_data=True).findings == []


def test_version_2_store_is_upgraded_without_moving_data(tmp_path):
    """Every physical block of a version 2 store is block p of segment 0: the data file is untouched."""
    store, files = _v2_store_with_files(tmp_path)
    used = _used_blocks(store)
    with open(os.path.join(store, DATA_NAME), "rb") as f:
        before = f.read(used * 4096)
    v = Volume.open(store)
    try:
        assert [r[0] for r in v.db.execute("SELECT own_seg FROM inodes")] == [0] * 4
        assert v.db.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 0
        a = v.create(1, b"new", 0o644, 0, 0).ino
        v.write(a, 0, b"x" * 9000)
        v.commit()
        old = v.db.execute("SELECT pblock, nblocks FROM extents WHERE ino != ?", (a,)).fetchall()
        assert max(p + n for p, n in old) <= schema.get_meta(v.db, "data_blocks")   # still in segment 0
        assert v.wholeness(a).whole and v.wholeness(a).segment == 1     # a new file gets a segment
    finally:
        v.close()
    with open(os.path.join(store, DATA_NAME), "rb") as f:
        assert f.read(len(before)) == before          # the blocks in use kept their bytes and places
    assert os.listdir(os.path.join(store, schema.SEGS_NAME)) == ["1"]
