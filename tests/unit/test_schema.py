"""Creating and opening stores; every refusal is a StoreError with a one-line message."""
import os
import sqlite3
import stat

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
    v.write(ino, 0, b"x" * 10000)
    v.close()
    os.truncate(os.path.join(store, DATA_NAME), 0)
    assert "data file is empty" in _one_line_error(store)


def test_store_in_use(store):
    v = Volume.open(store)
    try:
        assert "in use" in _one_line_error(store)
    finally:
        v.close()
    Volume.open(store).close()    # the lock is released on close


def test_version_1_store_is_upgraded_on_open(tmp_path):
    """A version 1 store (one checksum row per block, signed) opens as version 2 with the same sums."""
    import xxhash
    store = str(tmp_path / "v1")
    mkfs(store)
    v = Volume.open(store)
    a = v.create(1, b"a", 0o644, 0, 0).ino
    data = os.urandom(1500 * 4096 + 100)
    v.write(a, 0, data)
    v.commit()
    v.close()
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
        assert schema.get_meta(v.db, "schema_version") == SCHEMA_VERSION == 2
        rows = v.db.execute("SELECT pblock, nblocks FROM csums ORDER BY pblock").fetchall()
        assert len(rows) == -(-len(per_block) // schema.CSUM_RUN)
        assert bytes(v.read(a, 0, len(data))) == data       # every block verifies against its upgraded sum
    finally:
        v.close()
    from reflinkfs.check import fsck
    assert fsck(store, verify_data=True).findings == []
